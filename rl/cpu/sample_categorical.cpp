#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "rl/kernels.h"

namespace statemamba::rl::detail {

void categorical_from_uniform_cpu(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions) {
  const int64_t rows = logits.size(0), a_count = logits.size(1), stride = logits.stride(0);
  const float* l = logits.data_ptr<float>();
  const float* uniform = u.data_ptr<float>();
  int64_t* out = actions.data_ptr<int64_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = l + n * stride;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t a = 0; a < a_count; ++a) m = std::max(m, row[a]);
      float total = 0;
      for (int64_t a = 0; a < a_count; ++a) total += std::exp(row[a] - m);
      // Walk the CDF; rounding can leave the last partial sum at or below target: then the last
      // action with any probability.
      const float target = uniform[n] * total;
      float cumulative = 0;
      int64_t chosen = -1, last_possible = 0;
      for (int64_t a = 0; a < a_count; ++a) {
        const float p = std::exp(row[a] - m);
        if (p > 0) last_possible = a;
        cumulative += p;
        if (cumulative > target) {
          chosen = a;
          break;
        }
      }
      out[n] = chosen >= 0 ? chosen : last_possible;
    }
  });
}

}  // namespace statemamba::rl::detail
