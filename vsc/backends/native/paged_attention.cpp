// vsc native CPU kernel: decode attention that reads K/V in place through the block table.
//
// One query per sequence. For each (sequence, kv head) pair -- the unit of parallel work --
// the g = heads / kv_heads query heads that share that kv head score every context position
// (each K row is read once for all g heads), softmax in fp32, then accumulate V (each V row
// read once). No context is copied out of the cache: that copy is what the torch kernel
// (index_select of blocks, then SDPA) pays per layer per step.
//
// Layouts (all contiguous, fp32): q [B, H, D]; k_cache, v_cache [slots, KVH, D] with
// slot = block * block_size + offset; block_tables [B, W] int64; context_lens [B] int64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q [B,H,D], caches [slots,KVH,D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32 &&
              v_cache.scalar_type() == torch::kFloat32, "fp32 tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block_tables and context_lens are int64");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0, "head_dim / heads do not match the cache");
  const int64_t G = H / KVH, W = block_tables.size(1), slots = k_cache.size(0);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= W * block_size, "context length outside the block table");
  }
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    std::vector<float> mx(G), denom(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH, n = lens[b];
      const float* qb = qp + (b * H + h * G) * D;
      scores.resize(G * n);
      std::fill(mx.begin(), mx.end(), -INFINITY);
      for (int64_t t0 = 0; t0 < n; t0 += block_size) {
        const int64_t block = bt[b * W + t0 / block_size];
        const int64_t count = std::min(block_size, n - t0);
        TORCH_CHECK(block >= 0 && (block + 1) * block_size <= slots, "block id outside the cache");
        for (int64_t o = 0; o < count; ++o) {
          const float* kt = kp + ((block * block_size + o) * KVH + h) * D;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qb + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * kt[d];
            s *= sc;
            scores[g * n + t0 + o] = s;
            mx[g] = std::max(mx[g], s);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        float* row = scores.data() + g * n;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - mx[g]);
          sum += row[t];
        }
        denom[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += block_size) {
        const int64_t block = bt[b * W + t0 / block_size];
        const int64_t count = std::min(block_size, n - t0);
        for (int64_t o = 0; o < count; ++o) {
          const float* vt = vp + ((block * block_size + o) * KVH + h) * D;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * n + t0 + o];
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * vt[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / denom[g];
        float* dst = op + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[g * D + d] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged fp32 KV cache, read in place through the block table");
}
