// Streams a sequence through a small model in chunks, saving the state to a file and reloading it
// after every chunk (alternating .pt and .h5), and checks that this gives the outputs of one pass.
// Usage: consumer <scratch directory>
#include <statemamba/mamba/modules.h>
#include <torch/torch.h>

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) try {
  using namespace statemamba;
  const std::string dir = argc > 1 ? argv[1] : ".";
  torch::manual_seed(0);
  MambaLMHeadModel model(MambaConfig(/*d_model=*/32, /*n_layer=*/2, /*vocab_size=*/100));
  torch::NoGradGuard no_grad;
  const auto ids = torch::randint(0, 100, {2, 40});
  const auto expected = model->forward(ids);

  auto state = MambaStackState::zeros(model->options, /*batch=*/2);
  std::vector<torch::Tensor> chunks;
  for (int64_t t = 0; t < 40; t += 8) {
    chunks.push_back(model->forward(ids.slice(1, t, t + 8), &state));
    const std::string path = dir + (t % 16 ? "/state.h5" : "/state.pt");
    state.save(path);
    state = MambaStackState::load(path, model->options);
  }
  const auto streamed = torch::cat(chunks, 1);
  const bool ok = state.tokens == 40 && torch::allclose(streamed, expected, /*rtol=*/1e-4, /*atol=*/1e-6);
  std::cout << (ok ? "ok" : "MISMATCH") << ": " << state.tokens << " tokens streamed in chunks of 8, max |difference| "
            << (streamed - expected).abs().max().item<double>() << "\n";
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "consumer: " << e.what() << "\n";
  return 1;
}
