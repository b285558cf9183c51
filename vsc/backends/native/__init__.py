"""Native CPU kernels (C++ torch extensions) that a plan selects, built ahead of time by `vsc compile`."""
