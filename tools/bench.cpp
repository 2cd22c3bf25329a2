// statemamba-bench: times the ops (and, on CUDA, a device-to-device copy for the memory floor) and
// prints one JSON document. Each case reports the median and best of --repeats timed runs and its
// "floor": the bytes it must move divided by the measured copy rate (CUDA) — a ratio near 1 means
// the op runs at memory speed.
//
// --model times the language model instead (mamba-130m's shape by default, random weights):
// prefill (forward over [batch, prompt] tokens, full logits) and decode (step() per token, greedy
// argmax on the device, so no host sync between tokens), in tokens per second.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cxxopts.hpp>
#include <functional>
#include <tuple>
#include <iostream>
#include <nlohmann/json.hpp>

#include "mamba/cuda_graph_decoder.h"
#include "mamba/modules.h"
#include "ops/ops.h"
#include "tools/cli_errors.h"

#ifdef STATEMAMBA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sm = statemamba::ops;
using json = nlohmann::json;

namespace {

struct Timing {
  double median_ms, best_ms;
};

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

Timing time_it(const torch::Device& device, int repeats, const std::function<void()>& fn) {
  fn();  // warm-up (and lazy init)
  sync(device);
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    sync(device);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

#ifdef STATEMAMBA_WITH_CUDA
// GPU time per call without host launch gaps: `inner` calls captured in one CUDA graph, replayed
// `repeats` times between CUDA events (the ops allocate from the graph's private pool).
Timing time_graph(int repeats, const std::function<void()>& fn, int inner = 10) {
  fn();  // warm-up (lazy init, kernel attribute set-up) outside the capture
  auto stream = c10::cuda::getStreamFromPool();
  at::cuda::CUDAGraph graph;
  {
    c10::cuda::CUDAStreamGuard guard(stream);
    fn();
    stream.synchronize();
    graph.capture_begin();
    for (int i = 0; i < inner; ++i) fn();
    graph.capture_end();
  }
  graph.replay();
  torch::cuda::synchronize();
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), end(cudaEventDefault);
    start.record();
    graph.replay();
    end.record();
    end.synchronize();
    ms.push_back(start.elapsed_time(end) / inner);
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}
#endif

// Op timings: graph replays on CUDA, host clock otherwise.
Timing time_op(const torch::Device& device, int repeats, const std::function<void()>& fn) {
#ifdef STATEMAMBA_WITH_CUDA
  if (device.is_cuda()) return time_graph(repeats, fn);
#endif
  return time_it(device, repeats, fn);
}

// State and accumulation: float32, float64 only for float64 inputs (as the ops require).
torch::ScalarType state_dtype(torch::ScalarType input) { return input == torch::kDouble ? torch::kDouble : torch::kFloat; }

torch::ScalarType parse_dtype(const std::string& s) {
  if (s == "float32") return torch::kFloat;
  if (s == "bfloat16") return torch::kBFloat16;
  if (s == "float16") return torch::kHalf;
  if (s == "float64") return torch::kDouble;
  throw cxxopts::exceptions::exception("--dtype must be float32, bfloat16, float16 or float64, got '" + s + "'");
}

// ---- the model ---------------------------------------------------------------------------------

struct ModelBench {
  int64_t d_model, n_layer, vocab;
  int64_t prefill_batch, prompt_length;
  std::vector<int64_t> decode_batches;
  int64_t decode_steps;
  int repeats;
  bool graphs;  // also decode through CudaGraphDecoder
};

// The H100 figures in tokens/s (mamba_ssm's, and the target), for the mamba-130m shape.
struct ModelFigure {
  const char* phase;
  torch::ScalarType dtype;
  int64_t batch, length;  // length: the prompt for prefill, 0 for decode
  double official, target;
};
constexpr ModelFigure kModelFigures[] = {
    {"prefill", torch::kBFloat16, 8, 2048, 613e3, 900e3},
    {"decode", torch::kBFloat16, 1, 0, 1243, 4000},  // mamba_ssm's with CUDA graphs
    {"decode", torch::kBFloat16, 64, 0, 66.9e3, 130e3},
};

void add_figures(json& c, const ModelBench& m, const std::string& phase, torch::ScalarType dt, int64_t batch,
                 int64_t length, double tokens_per_s) {
  if (m.d_model != 768 || m.n_layer != 24 || m.vocab != 50280) return;
  for (const auto& f : kModelFigures)
    if (phase == f.phase && dt == f.dtype && batch == f.batch && length == f.length) {
      c["official_tokens_per_s"] = f.official;
      c["vs_official"] = tokens_per_s / f.official;
      c["target_tokens_per_s"] = f.target;
      c["vs_target"] = tokens_per_s / f.target;
    }
}

double tensor_bytes(const at::Tensor& t) { return double(t.numel()) * t.element_size(); }

json model_cases(const torch::Device& device, torch::ScalarType dt, const ModelBench& m, double copy_gbps) {
  namespace st = statemamba;
  torch::manual_seed(0);
  st::MambaLMHeadModel model(st::MambaConfig(m.d_model, m.n_layer, m.vocab));
  model->to(device, dt);
  model->eval();
  const auto state_dt = model->state_dtype();
  const int64_t padded_vocab = model->options.padded_vocab_size();
  const auto ids_options = torch::TensorOptions(device).dtype(torch::kLong);
  double param_bytes = 0, param_count = 0;
  for (const auto& p : model->parameters()) param_bytes += tensor_bytes(p), param_count += double(p.numel());
  // Matmul work per token: 2 flops per weight of every Linear and of the (tied) head; the
  // embedding lookup, norms, conv and scan are small beside it.
  const double embed_params = double(padded_vocab) * m.d_model;
  const double flops_per_token = 2.0 * (param_count - embed_params) + 2.0 * embed_params;

  json cases = json::array();
  const std::string dtype_name(c10::toString(dt));
  {
    const int64_t B = m.prefill_batch, L = m.prompt_length;
    auto ids = torch::randint(m.vocab, {B, L}, ids_options);
    Timing t = time_it(device, m.repeats, [&] {
      auto state = st::MambaStackState::zeros(model->options, B, device, state_dt);
      model->forward(ids, &state);
    });
    const double tokens_per_s = B * L / (t.median_ms * 1e-3);
    json c = {{"phase", "prefill"}, {"dtype", dtype_name}, {"batch", B}, {"length", L},
              {"median_ms", t.median_ms}, {"best_ms", t.best_ms}, {"tokens_per_s", tokens_per_s},
              {"matmul_TFLOPs", flops_per_token * tokens_per_s * 1e-12}};
    add_figures(c, m, "prefill", dt, B, L, tokens_per_s);
    std::cerr << "prefill " << dtype_name << " B" << B << " L" << L << ": " << tokens_per_s << " tokens/s" << std::endl;
    cases.push_back(c);
  }
  std::vector<std::string> modes{"eager"};
  if (m.graphs) modes.push_back("graph");
  for (int64_t B : m.decode_batches) {
    for (const auto& mode : modes) {
      auto state = st::MambaStackState::zeros(model->options, B, device, state_dt);
      auto first = torch::randint(m.vocab, {B}, ids_options);
      // Greedy decoding: each step's argmax is the next input, so nothing waits on the host.
      Timing t{};
      if (mode == "eager") {
        t = time_it(device, m.repeats, [&] {
          at::Tensor ids = first;
          for (int64_t i = 0; i < m.decode_steps; ++i) ids = model->step(ids, state).argmax(-1);
        });
      } else {
        st::CudaGraphDecoder decoder(model, B);
        t = time_it(device, m.repeats, [&] {
          at::Tensor ids = first;
          for (int64_t i = 0; i < m.decode_steps; ++i) ids = decoder.step(ids).argmax(-1);
        });
      }
      const double tokens_per_s = B * m.decode_steps / (t.median_ms * 1e-3);
      // Floor: every weight read once per step, the state read and written, the logits written.
      double state_bytes = 0;
      for (const auto& layer : state.layers) state_bytes += tensor_bytes(layer.conv_state) + tensor_bytes(layer.ssm_state);
      const double step_bytes = param_bytes + 2 * state_bytes + double(B) * padded_vocab * torch::elementSize(dt);
      json c = {{"phase", "decode"}, {"mode", mode}, {"dtype", dtype_name}, {"batch", B},
                {"steps", m.decode_steps}, {"median_ms", t.median_ms}, {"best_ms", t.best_ms},
                {"ms_per_step", t.median_ms / m.decode_steps}, {"tokens_per_s", tokens_per_s}, {"step_bytes", step_bytes}};
      if (copy_gbps > 0) {
        const double floor_ms = step_bytes / (copy_gbps * 1e6);
        c["floor_ms_per_step"] = floor_ms;
        c["floor_ratio"] = (t.median_ms / m.decode_steps) / floor_ms;
      }
      if (mode == "graph") add_figures(c, m, "decode", dt, B, 0, tokens_per_s);  // mamba_ssm's are with graphs
      std::cerr << "decode " << mode << " " << dtype_name << " B" << B << ": " << tokens_per_s << " tokens/s" << std::endl;
      cases.push_back(c);
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("statemamba-bench", "Time the statemamba ops (or, with --model, the language model); prints JSON.");
  cli.add_options()("device", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "dtype", "float32, bfloat16, float16, float64",
      cxxopts::value<std::vector<std::string>>()->default_value("float32"))(
      "b,batch", "batch", cxxopts::value<int64_t>()->default_value("2"))(
      "d,dim", "d_inner", cxxopts::value<int64_t>()->default_value("1536"))(
      "l,length", "sequence length", cxxopts::value<int64_t>()->default_value("512"))(
      "n,dstate", "d_state", cxxopts::value<int64_t>()->default_value("16"))(
      "w,width", "conv width", cxxopts::value<int64_t>()->default_value("4"))(
      "decode-batch", "batch for the decode ops", cxxopts::value<int64_t>()->default_value("64"))(
      "r,repeats", "timed runs per case (default 10; 3 with --model)", cxxopts::value<int>())(
      "threads", "CPU threads for torch's intra-op pool (default: torch's choice)", cxxopts::value<int>())(
      "h,help", "show this help");
  cli.add_options("model")("model", "time MambaLMHeadModel prefill and decode instead of the ops")(
      "d-model", "d_model", cxxopts::value<int64_t>()->default_value("768"))(
      "layers", "n_layer", cxxopts::value<int64_t>()->default_value("24"))(
      "vocab", "vocab_size", cxxopts::value<int64_t>()->default_value("50280"))(
      "prefill-batch", "prefill batch", cxxopts::value<int64_t>()->default_value("1"))(
      "prompt-length", "prefill tokens per row", cxxopts::value<int64_t>()->default_value("256"))(
      "decode-batches", "decode batch sizes (comma-separated)",
      cxxopts::value<std::vector<int64_t>>()->default_value("1"))(
      "decode-steps", "tokens per decode run", cxxopts::value<int64_t>()->default_value("32"))(
      "graphs", "also decode through a CUDA graph (CudaGraphDecoder; --device cuda only)");
  cxxopts::ParseResult args;
  torch::Device device(torch::kCPU);
  std::vector<torch::ScalarType> dtypes;
  try {
    args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    device = torch::Device(args["device"].as<std::string>());
    if (device.is_cuda() && !torch::cuda::is_available())
      throw cxxopts::exceptions::exception("--device cuda: no CUDA GPU is available");
    for (auto& s : args["dtype"].as<std::vector<std::string>>()) dtypes.push_back(parse_dtype(s));
    for (const char* k : {"batch", "dim", "length", "dstate", "width", "decode-batch", "d-model", "layers", "vocab",
                          "prefill-batch", "prompt-length", "decode-steps"})
      if (args[k].as<int64_t>() < 1)
        throw cxxopts::exceptions::exception(std::string("--") + k + " must be at least 1, got " +
                                             std::to_string(args[k].as<int64_t>()));
    for (int64_t b : args["decode-batches"].as<std::vector<int64_t>>())
      if (b < 1) throw cxxopts::exceptions::exception("--decode-batches must all be at least 1, got " + std::to_string(b));
    if (args.count("graphs") && !device.is_cuda())
      throw cxxopts::exceptions::exception("--graphs needs --device cuda (CUDA graphs), got --device " + device.str());
    if (args.count("threads")) {
      if (args["threads"].as<int>() < 1)
        throw cxxopts::exceptions::exception("--threads must be at least 1, got " +
                                             std::to_string(args["threads"].as<int>()));
      at::set_num_threads(args["threads"].as<int>());
    }
    if (args.count("repeats") && args["repeats"].as<int>() < 1)
      throw cxxopts::exceptions::exception("--repeats must be at least 1, got " + std::to_string(args["repeats"].as<int>()));
  } catch (const std::exception& e) {
    std::cerr << "statemamba-bench: " << e.what() << statemamba::tools::option_of_bad_value(argc, argv, e.what()) << "\n" << cli.help() << std::endl;
    return 2;
  }
  const int64_t B = args["batch"].as<int64_t>(), D = args["dim"].as<int64_t>(), L = args["length"].as<int64_t>();
  const int64_t N = args["dstate"].as<int64_t>(), W = args["width"].as<int64_t>();
  const int64_t Bd = args["decode-batch"].as<int64_t>();
  const bool model_mode = args.count("model") > 0;
  const int repeats = args.count("repeats") ? args["repeats"].as<int>() : model_mode ? 3 : 10;
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);

  json out;
  out["device"] = device.is_cuda() ? "cuda" : "cpu";
  out["threads"] = at::get_num_threads();
  double copy_gbps = 0;
  if (device.is_cuda()) {
    // The memory floor: a large device-to-device copy (read + write), in the same run.
    auto src = torch::empty({256 << 20}, torch::TensorOptions(device).dtype(torch::kFloat)), dst = torch::empty_like(src);
    Timing t = time_it(device, repeats, [&] { dst.copy_(src); });
    copy_gbps = 2.0 * src.numel() * 4 / (t.best_ms * 1e6);
    out["copy_GBps"] = copy_gbps;
  }
  if (model_mode) {
    const ModelBench m{args["d-model"].as<int64_t>(),       args["layers"].as<int64_t>(),
                       args["vocab"].as<int64_t>(),         args["prefill-batch"].as<int64_t>(),
                       args["prompt-length"].as<int64_t>(), args["decode-batches"].as<std::vector<int64_t>>(),
                       args["decode-steps"].as<int64_t>(),  repeats,
                       args.count("graphs") > 0};
    out["model"] = {{"d_model", m.d_model}, {"n_layer", m.n_layer}, {"vocab_size", m.vocab}, {"weights", "random"}};
    out["timing"] = "host clock around a whole prefill or decode run (synchronized), median and best of the repeats";
    json cases = json::array();
    for (auto dt : dtypes)
      for (auto& c : model_cases(device, dt, m, copy_gbps)) cases.push_back(c);
    out["cases"] = cases;
    std::cout << out.dump(2) << std::endl;
    return 0;
  }
  out["timing"] = device.is_cuda() ? "CUDA graph of 10 calls, replayed; CUDA events; median and best per call"
                                   : "host clock per call";
  json cases = json::array();
  auto record = [&](const std::string& op, torch::ScalarType dt, json shape, double bytes, Timing t) {
    json c = {{"op", op}, {"dtype", std::string(c10::toString(dt))}, {"shape", shape},
              {"median_ms", t.median_ms}, {"best_ms", t.best_ms}, {"bytes", bytes},
              {"GBps", bytes / (t.median_ms * 1e6)}};
    if (copy_gbps > 0) {
      c["floor_ms"] = bytes / (copy_gbps * 1e6);
      c["floor_ratio"] = t.median_ms / (bytes / (copy_gbps * 1e6));
    }
    std::cerr << op << " " << c10::toString(dt) << ": " << t.median_ms << " ms" << std::endl;
    cases.push_back(c);
  };

  for (auto dt : dtypes) {
    auto opt = torch::TensorOptions(device).dtype(dt);
    auto f32 = torch::TensorOptions(device).dtype(state_dtype(dt));
    const double e = torch::elementSize(dt), es = torch::elementSize(state_dtype(dt));
    auto u = torch::randn({B, D, L}, opt), delta = torch::randn({B, D, L}, opt) - 2, z = torch::randn({B, D, L}, opt);
    auto A = -torch::rand({D, N}, f32) - 0.5, Bm = torch::randn({B, N, L}, opt), Cm = torch::randn({B, N, L}, opt);
    auto Dv = torch::randn({D}, f32), bias = torch::randn({D}, f32) * 0.1, h0 = torch::randn({B, D, N}, f32);
    auto reset = torch::rand({B, L}, torch::TensorOptions(device)) < 0.001;
    json scan_shape = {{"batch", B}, {"dim", D}, {"length", L}, {"dstate", N}};
    // Reads u, delta, z, B, C, the initial state and the resets; writes y and the final state.
    const double scan_bytes = e * (4.0 * B * D * L + 2.0 * B * N * L) + es * 2.0 * B * D * N + B * L;
    record("selective_scan_fwd", dt, scan_shape, scan_bytes, time_op(device, repeats, [&] {
             sm::selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, true, h0, reset);
           }));
    // As the official mamba_ssm figures: no initial state, no resets.
    const double plain_bytes = e * (4.0 * B * D * L + 2.0 * B * N * L) + es * B * D * N;
    record("selective_scan_fwd_no_state_no_reset", dt, scan_shape, plain_bytes, time_op(device, repeats, [&] {
             sm::selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, true, std::nullopt, std::nullopt);
           }));
    {
      // The backward op alone, and forward + backward ops (what one training step of the op costs;
      // the autograd case below adds autograd's own work). Backward reads u, delta, z, B, C, dy and
      // writes du, ddelta, dz, dB, dC: 9 [B, D, L]-sized passes less the small B/C ones.
      auto [y, hT] = sm::selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, true, h0, reset);
      auto gy = torch::randn_like(y), gT = torch::randn_like(hT);
      const double bwd_bytes = e * (7.0 * B * D * L + 4.0 * B * N * L) + es * 3.0 * B * D * N + B * L;
      record("selective_scan_bwd", dt, scan_shape, bwd_bytes, time_op(device, repeats, [&] {
               sm::selective_scan_backward(gy, gT, u, delta, A, Bm, Cm, Dv, z, bias, true, h0, reset);
             }));
      record("selective_scan_fwd_then_bwd_ops", dt, scan_shape, scan_bytes + bwd_bytes, time_op(device, repeats, [&] {
               sm::selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, true, h0, reset);
               sm::selective_scan_backward(gy, gT, u, delta, A, Bm, Cm, Dv, z, bias, true, h0, reset);
             }));
      record("selective_scan_fwd_then_bwd_ops_no_state_no_reset", dt, scan_shape, plain_bytes + bwd_bytes,
             time_op(device, repeats, [&] {
               sm::selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, true, std::nullopt, std::nullopt);
               sm::selective_scan_backward(gy, std::nullopt, u, delta, A, Bm, Cm, Dv, z, bias, true, std::nullopt,
                                           std::nullopt);
             }));
    }
    {
      torch::AutoGradMode grad(true);
      auto ug = u.clone().requires_grad_(), dg = delta.clone().requires_grad_(), Bg = Bm.clone().requires_grad_();
      auto Cg = Cm.clone().requires_grad_(), zg = z.clone().requires_grad_(), h0g = h0.clone().requires_grad_();
      // Backward also writes du, ddelta, dz, dB, dC and reads dy: roughly 2.5x the forward's traffic.
      record("selective_scan_fwd_bwd", dt, scan_shape, 2.5 * scan_bytes, time_it(device, repeats, [&] {
               auto [y, hT] = sm::selective_scan(ug, dg, A, Bg, Cg, Dv, zg, bias, true, h0g, reset);
               (y.sum() + hT.sum()).backward();
             }));
    }
    auto w = torch::randn({D, W}, f32), cb = torch::randn({D}, f32), c0 = torch::randn({B, D, W - 1}, f32);
    const double conv_bytes = e * 2.0 * B * D * L + es * 2.0 * B * D * (W - 1) + B * L;
    json conv_shape = {{"batch", B}, {"dim", D}, {"length", L}, {"width", W}};
    record("causal_conv1d_fwd", dt, conv_shape, conv_bytes,
           time_op(device, repeats, [&] { sm::causal_conv1d(u, w, cb, c0, reset, true); }));
    record("causal_conv1d_fwd_no_state_no_reset", dt, conv_shape, e * 2.0 * B * D * L + es * B * D * (W - 1),
           time_op(device, repeats, [&] { sm::causal_conv1d(u, w, cb, std::nullopt, std::nullopt, true); }));
    {
      auto gy = torch::randn_like(u);
      record("causal_conv1d_bwd", dt, conv_shape, e * 3.0 * B * D * L + B * L, time_op(device, repeats, [&] {
               sm::causal_conv1d_backward(gy, std::nullopt, u, w, cb, c0, reset, true);
             }));
    }

    auto state = torch::randn({Bd, D, N}, f32), xs = torch::randn({Bd, D}, opt), dts = torch::randn({Bd, D}, opt);
    auto Bs = torch::randn({Bd, N}, opt), Cs = torch::randn({Bd, N}, opt), zs = torch::randn({Bd, D}, opt);
    const double upd_bytes = es * 2.0 * Bd * D * N + e * 4.0 * Bd * D;
    record("selective_state_update", dt, {{"batch", Bd}, {"dim", D}, {"dstate", N}}, upd_bytes,
           time_op(device, repeats, [&] { sm::selective_state_update(state, xs, dts, A, Bs, Cs, Dv, zs, bias, true); }));
    // The decode step's projections (in_proj [2D, D/2], out_proj [D/2, D]) at small batches: the GEMV
    // kernels against at::linear (cuBLAS) on the same inputs. Floor: the weight read once.
    for (const auto& [name, out_f, in_f] : {std::tuple<const char*, int64_t, int64_t>{"in_proj", 2 * D, D / 2},
                                            {"out_proj", D / 2, D}}) {
      const auto weight = torch::randn({out_f, in_f}, opt);
      for (int64_t rows : {1, 2, 4}) {
        const auto x = torch::randn({rows, in_f}, opt);
        const json shape = {{"layer", name}, {"batch", rows}, {"out_features", out_f}, {"in_features", in_f}};
        const double bytes = e * (double(out_f) * in_f + double(rows) * (in_f + out_f));
        record("small_batch_linear", dt, shape, bytes,
               time_op(device, repeats, [&] { sm::small_batch_linear(x, weight); }));
        record("at_linear", dt, shape, bytes, time_op(device, repeats, [&] { at::linear(x, weight); }));
      }
    }
    auto cstate = torch::randn({Bd, D, W - 1}, f32);
    record("causal_conv1d_update", dt, {{"batch", Bd}, {"dim", D}, {"width", W}}, es * 2.0 * Bd * D * (W - 1) + e * 2.0 * Bd * D,
           time_op(device, repeats, [&] { sm::causal_conv1d_update(xs, cstate, w, cb, true); }));
  }
  out["cases"] = cases;
  std::cout << out.dump(2) << std::endl;
  return 0;
}
