// statemamba-demo: streams one long sequence through the selective scan and the causal conv in
// chunks, carrying the explicit state from chunk to chunk (with episode resets falling inside and
// on chunk edges), and checks that the result equals a single pass over the whole sequence.
#include <torch/torch.h>

#include <cxxopts.hpp>
#include <iostream>

#include "ops/ops.h"
#include "tools/cli_errors.h"

namespace sm = statemamba::ops;

int main(int argc, char** argv) {
  cxxopts::Options cli("statemamba-demo", "Stream a sequence through the statemamba ops in chunks and "
                                          "check that it equals one pass.");
  cli.add_options()("b,batch", "batch rows", cxxopts::value<int64_t>()->default_value("4"))(
      "d,dim", "channels (d_inner)", cxxopts::value<int64_t>()->default_value("64"))(
      "n,dstate", "state size", cxxopts::value<int64_t>()->default_value("16"))(
      "l,length", "sequence length", cxxopts::value<int64_t>()->default_value("4096"))(
      "c,chunk", "chunk length", cxxopts::value<int64_t>()->default_value("300"))(
      "seed", "random seed", cxxopts::value<uint64_t>()->default_value("0"))("h,help", "show this help");
  int64_t B, D, N, L, chunk;
  try {
    auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    B = args["batch"].as<int64_t>(), D = args["dim"].as<int64_t>(), N = args["dstate"].as<int64_t>();
    L = args["length"].as<int64_t>(), chunk = args["chunk"].as<int64_t>();
    if (B < 1 || D < 1 || N < 1 || L < 1 || chunk < 1) throw cxxopts::exceptions::exception("--batch, --dim, --dstate, --length and --chunk must be at least 1");
    torch::manual_seed(args["seed"].as<uint64_t>());
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "statemamba-demo: " << e.what() << statemamba::tools::option_of_bad_value(argc, argv, e.what()) << "\n" << cli.help() << std::endl;
    return 2;
  }

  auto u = torch::randn({B, D, L}), delta = torch::randn({B, D, L}) - 1, z = torch::randn({B, D, L});
  auto A = -torch::rand({D, N}) - 0.1, Bm = torch::randn({B, N, L}), Cm = torch::randn({B, N, L});
  auto Dv = torch::randn({D}), bias = torch::randn({D}) * 0.1, w = torch::randn({D, 4}) * 0.5;
  auto reset = torch::rand({B, L}) < 2.0 / chunk;  // about two episode starts per chunk
  reset.index_put_({torch::indexing::Slice(), chunk}, true);  // and one exactly on a chunk edge

  auto [x_ref, conv_final_ref] = sm::causal_conv1d(u, w, bias, std::nullopt, reset, true);
  auto [y_ref, ssm_final_ref] = sm::selective_scan(x_ref, delta, A, Bm, Cm, Dv, z, bias, true, std::nullopt, reset);

  torch::Tensor conv_state = torch::zeros({B, D, 3}), ssm_state = torch::zeros({B, D, N});
  std::vector<torch::Tensor> ys;
  for (int64_t t0 = 0; t0 < L; t0 += chunk) {
    const int64_t len = std::min(chunk, L - t0);
    auto part = [&](const torch::Tensor& t) { return t.narrow(-1, t0, len); };
    auto [x, conv_next] = sm::causal_conv1d(part(u), w, bias, conv_state, part(reset), true);
    auto [y, ssm_next] = sm::selective_scan(x, part(delta), A, part(Bm), part(Cm), Dv, part(z), bias, true,
                                            ssm_state, part(reset));
    ys.push_back(y);
    conv_state = conv_next, ssm_state = ssm_next;
  }
  auto y = torch::cat(ys, -1);
  const double y_err = (y - y_ref).abs().max().item<double>();
  const double state_err = (ssm_state - ssm_final_ref).abs().max().item<double>();
  const bool exact = torch::equal(y, y_ref) && torch::equal(ssm_state, ssm_final_ref) &&
                     torch::equal(conv_state, conv_final_ref);
  std::cout << "streamed " << L << " steps x " << B << " rows in chunks of " << chunk << " ("
            << reset.sum().item<int64_t>() << " episode resets)\n"
            << "max |y_chunked - y_one_pass|           = " << y_err << "\n"
            << "max |state_chunked - state_one_pass|   = " << state_err << "\n"
            << (exact ? "chunked == one pass, bit for bit" : "MISMATCH: chunked != one pass") << std::endl;
  return exact ? 0 : 1;
}
