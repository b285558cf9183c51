"""Makes http_fakes importable by the tests in this folder (pytest puts this folder on sys.path)."""
