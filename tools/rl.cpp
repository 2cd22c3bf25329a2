// statemamba-rl: trains recurrent policies (Mamba, GRU) with PPO on memory tasks, in rollout chunks
// of a never-ending stream of staggered episodes, and reports how well they remember.
//
//   statemamba-rl                                                   # quick run with the defaults
//   statemamba-rl --mode quick --controller gru --horizon 200 --num-bits 3 --total-updates 300
//   statemamba-rl --mode scale --num-bits 4 --num-envs 64 --horizons 1000 5000 10000 20000
//   statemamba-rl --mode throughput --num-envs 1024 --cuda-graph   # rollout env-steps/s, no learning
//
// Writes into --out (default out/rl): per run <controller>-h<horizon>.csv and .json (every update's
// statistics) and checkpoint-<controller>-h<horizon>.pt (with --grad-norms also
// <controller>-h<horizon>-grad-norms.csv); accuracy.png (accuracy against updates, one curve per
// run); in scale mode results.md and results.csv; in throughput mode throughput.json (also printed).
// --resume continues from the checkpoints.
#include <sys/stat.h>
#include <unistd.h>

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "rl/env.h"
#include "rl/plot.h"
#include "rl/policy.h"
#include "rl/ppo.h"
#include "rl/throughput.h"
#include "tools/cli_errors.h"

namespace rl = statemamba::rl;
using json = nlohmann::json;

namespace {

struct Config {
  std::string mode;
  std::vector<std::string> controllers;
  std::vector<int64_t> horizons;
  rl::EnvOptions env;
  rl::PolicyOptions policy;
  rl::PPOOptions ppo;
  int64_t total_updates = 0, checkpoint_every = 0;
  torch::Device device = torch::kCPU;
  std::string out;
  bool resume = false, report_only = false;
  int64_t throughput_steps = 0;
  double stop_at = 0, time_limit = 0;
  bool cuda_graph = false, decode_step = false;
  bool gru_memory_auto = false;  // --gru-memory auto: twice each run's episode length
  int64_t curriculum_start = 0;  // 0: off
  double curriculum_factor = 2, curriculum_threshold = 0.9;
};

struct RunResult {
  std::string name, controller;
  int64_t horizon;
  int64_t episode_length;  // of the task asked for (a curriculum's last stage)
  std::vector<rl::UpdateStats> history;
  bool interrupted = false;
};

std::atomic<bool> g_interrupted{false};

[[noreturn]] void usage_error(const std::string& message) { throw cxxopts::exceptions::exception(message); }

// mkdir -p with POSIX calls: libtorch exports its own std::filesystem, which does not always work.
void make_dirs(const std::string& path) {
  for (size_t i = 1; i <= path.size(); ++i)
    if (i == path.size() || path[i] == '/') {
      const std::string prefix = path.substr(0, i);
      if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST)
        throw std::runtime_error("cannot create directory " + prefix + ": " + std::strerror(errno));
    }
}

// Whole or not at all: written beside, then renamed over the target.
void write_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    out << text;
    out.flush();
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::runtime_error("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string duration(double seconds) {
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, s / 60 % 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

std::string fixed(double v, int digits) {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string rate(double steps_per_second) {
  char buf[32];
  if (steps_per_second >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", steps_per_second / 1e6);
  else if (steps_per_second >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", steps_per_second / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", steps_per_second);
  return buf;
}

// ---- command line ------------------------------------------------------------------------------------

cxxopts::Options make_cli() {
  cxxopts::Options cli("statemamba-rl",
                       "Train recurrent policies (Mamba, GRU) with PPO on memory tasks, in rollout chunks with the\n"
                       "recurrent state carried across them; report accuracy curves, tables and checkpoints.\n");
  cli.custom_help("[options]").positional_help("");
  cli.add_options("run")
      ("mode", "quick (one controller, one horizon), scale (both controllers, every horizon) or throughput "
       "(rollout env-steps/s of both controllers, no learning; JSON)",
       cxxopts::value<std::string>()->default_value("quick"))
      ("controller", "quick mode: mamba or gru", cxxopts::value<std::string>()->default_value("mamba"))
      ("horizon", "quick mode: the memory task's delay (repeat-previous: the lag)",
       cxxopts::value<int64_t>()->default_value("16"))
      ("horizons", "scale mode: delays, space or comma separated",
       cxxopts::value<std::vector<int64_t>>()->default_value("1000,5000,10000,20000"))
      ("total-updates", "PPO updates per run", cxxopts::value<int64_t>()->default_value("150"))
      ("device", "cpu, cuda, cuda:N, or auto (cuda when there is one)", cxxopts::value<std::string>()->default_value("auto"))
      ("seed", "random seed (environments, initialisation, sampling)", cxxopts::value<uint64_t>()->default_value("0"))
      ("out", "output directory", cxxopts::value<std::string>()->default_value("out/rl"))
      ("resume", "continue each run from its checkpoint in --out, if there is one")
      ("report-only", "train nothing: write each run's metrics, the plot (and in scale mode the table) from "
       "the checkpoints in --out, e.g. after runs of one horizon each were trained at once")
      ("stop-at", "end a run early once its accuracy reaches this (0: never)", cxxopts::value<double>()->default_value("0"))
      ("time-limit", "end a run early before its training time would pass this many seconds (0: none)",
       cxxopts::value<double>()->default_value("0"))
      ("checkpoint-every", "updates between checkpoints (and one at the end)", cxxopts::value<int64_t>()->default_value("25"))
      ("threads", "CPU threads for torch (0: torch's default). The per-step ops are tiny: more threads gain "
       "nothing, and on a busy machine OpenMP's barriers make them much slower", cxxopts::value<int>()->default_value("1"))
      ("throughput-steps", "throughput mode: timed rollout steps per controller",
       cxxopts::value<int64_t>()->default_value("200"))
      ("cuda-graph", "throughput mode: capture the rollout step in a CUDA graph (needs a GPU)")
      ("decode-step", "throughput mode: step Mamba with the decode ops (fused on CUDA) instead of the scan "
       "ops over one step that PPO's rollout uses (for its exact replay)")
      ("h,help", "show this help");
  cli.add_options("task")
      ("task", "memory (multi-bit delayed memory) or repeat-previous (POPGym)",
       cxxopts::value<std::string>()->default_value("memory"))
      ("num-bits", "memory: bits to remember (2^k actions)", cxxopts::value<int64_t>()->default_value("2"))
      ("distractors", "memory: random noise on the bit channels during the delay")
      ("curriculum", "memory: a horizon curriculum starting at this delay (0: off). Whenever the accuracy over a "
       "full window of answers at the current delay reaches --curriculum-threshold, the delay of new episodes grows "
       "by --curriculum-factor, up to the run's horizon; statistics restart at each stage, and --stop-at, the best "
       "accuracy and the table count only the last stage", cxxopts::value<int64_t>()->default_value("0"))
      ("curriculum-factor", "memory: how much the curriculum's delay grows per stage", cxxopts::value<double>()->default_value("2"))
      ("curriculum-threshold", "memory: the accuracy that moves the curriculum on", cxxopts::value<double>()->default_value("0.9"))
      ("cards", "repeat-previous: distinct cards", cxxopts::value<int64_t>()->default_value("4"))
      ("episode-length", "repeat-previous: steps per episode (0: lag + 32)", cxxopts::value<int64_t>()->default_value("0"))
      ("num-envs", "environments stepped together", cxxopts::value<int64_t>()->default_value("64"));
  cli.add_options("policy")
      ("width", "d_model (Mamba) / hidden size (GRU)", cxxopts::value<int64_t>()->default_value("32"))
      ("layers", "Mamba blocks / GRU layers", cxxopts::value<int64_t>()->default_value("1"))
      ("d-state", "Mamba: state size per channel", cxxopts::value<int64_t>()->default_value("16"))
      ("dt-min", "Mamba: smallest initial step size; memory reaches about 1/dt-min steps",
       cxxopts::value<double>()->default_value("0.001"))
      ("dt-max", "Mamba: largest initial step size", cxxopts::value<double>()->default_value("0.1"))
      ("bc-init-scale", "Mamba: B and C start this many times nn.Linear's default size (see rl/policy.h)",
       cxxopts::value<double>()->default_value("16"))
      ("gru-memory", "GRU: chrono initialisation, units keep their value for up to this many steps at the start: "
       "a number > 2, auto (twice the episode length) or off (nn::GRU's default, which forgets within a few steps)",
       cxxopts::value<std::string>()->default_value("auto"));
  cli.add_options("ppo")
      ("rollout-len", "steps per environment per update (the chunk)", cxxopts::value<int64_t>()->default_value("64"))
      ("epochs", "passes over each chunk", cxxopts::value<int64_t>()->default_value("4"))
      ("minibatches", "groups of environments per pass (must divide --num-envs)", cxxopts::value<int64_t>()->default_value("2"))
      ("lr", "Adam learning rate", cxxopts::value<double>()->default_value("0.002"))
      ("lr-anneal", "the learning rate falls linearly to 0 over --total-updates (PPO's usual schedule; a "
       "resumed run keeps it if --total-updates is the same)")
      ("gamma", "discount", cxxopts::value<double>()->default_value("0.99"))
      ("gae-lambda", "GAE lambda. Lower than PPO's usual 0.95 because a memory task pays at the very step it grades: "
       "a long lambda spreads each answer's reward over the random actions before it, and that noise drowns the "
       "answer's own gradient (4 bits, H = 16, GRU: chance after 150 updates at 0.95, 94% at 0.5)",
       cxxopts::value<double>()->default_value("0.5"))
      ("clip", "PPO ratio clip", cxxopts::value<double>()->default_value("0.2"))
      ("value-coef", "value loss weight", cxxopts::value<double>()->default_value("0.5"))
      ("entropy-coef", "entropy bonus weight", cxxopts::value<double>()->default_value("0.01"))
      ("max-grad-norm", "gradient clipping norm", cxxopts::value<double>()->default_value("0.5"))
      ("advantage-norm", "std (each minibatch's advantages to mean 0 and std 1, PPO's usual) or off",
       cxxopts::value<std::string>()->default_value("std"))
      ("skip-grad-spikes", "skip a gradient step whose norm is more than this many times the median of the last 100 "
       "(0: off). Clipping keeps a spike's direction; Adam then moves the few parameters it sits in (Mamba's "
       "selection path: conv1d, x_proj, dt_proj) a long way, and the runs fell after such spikes",
       cxxopts::value<double>()->default_value("10"))
      ("replay", "how the update replays a chunk: chunk (one pass, ~3x faster on CPU; logits equal the "
       "rollout's to rounding) or step (one step at a time; bit-exact, the PPO ratio is exactly 1)",
       cxxopts::value<std::string>()->default_value("chunk"))
      ("grad-chunks", "chunks the gradient flows back through (1: truncated at each chunk's start; 0: enough "
       "to reach back from any query to its episode's start, ceil((horizon + 2) / rollout-len) + 1, per horizon)",
       cxxopts::value<int64_t>()->default_value("1"))
      ("accuracy-window", "graded answers that accuracy is the share of", cxxopts::value<int64_t>()->default_value("256"))
      ("grad-norms", "also write <run>-grad-norms.csv: every parameter's gradient norm (before clipping) at every "
       "gradient step of this process's updates, to find where a spike of grad_norm comes from");
  cli.parse_positional({"horizons"});  // so that "--horizons 1000 5000" reads as a list
  return cli;
}

Config parse(const cxxopts::ParseResult& args) {
  Config c;
  auto positive = [&](const char* flag) {
    const int64_t v = args[flag].as<int64_t>();
    if (v < 1) usage_error(std::string("--") + flag + " must be at least 1, got " + std::to_string(v));
    return v;
  };
  auto one_of = [&](const char* flag, std::initializer_list<const char*> choices) {
    const std::string v = args[flag].as<std::string>();
    for (const char* choice : choices)
      if (v == choice) return v;
    std::string list;
    for (const char* choice : choices) list += std::string(list.empty() ? "" : ", ") + choice;
    usage_error(std::string("--") + flag + " must be one of " + list + ", got '" + v + "'");
  };
  c.mode = one_of("mode", {"quick", "scale", "throughput"});
  if (c.mode == "throughput") {
    c.controllers = args.count("controller") ? std::vector<std::string>{one_of("controller", {"mamba", "gru"})}
                                             : std::vector<std::string>{"mamba", "gru"};
    if (args.count("horizons")) usage_error("--horizons is for --mode scale; throughput mode takes one --horizon");
    c.horizons = {args["horizon"].as<int64_t>()};
  } else if (c.mode == "quick") {
    c.controllers = {one_of("controller", {"mamba", "gru"})};
    if (args.count("horizons")) usage_error("--horizons is for --mode scale; quick mode takes one --horizon");
    c.horizons = {args["horizon"].as<int64_t>()};
  } else {
    if (args.count("controller")) usage_error("--controller is for --mode quick; scale mode runs both");
    if (args.count("horizon")) usage_error("--horizon is for --mode quick; scale mode takes --horizons");
    c.controllers = {"mamba", "gru"};
    c.horizons = args["horizons"].as<std::vector<int64_t>>();
  }
  for (int64_t h : c.horizons)
    if (h < 1) usage_error("--horizon(s) must be at least 1, got " + std::to_string(h));

  c.env.task = one_of("task", {"memory", "repeat-previous"});
  c.env.num_envs = positive("num-envs");
  c.env.num_bits = positive("num-bits");
  if (c.env.num_bits > 12) usage_error("--num-bits must be at most 12 (2^k actions), got " + std::to_string(c.env.num_bits));
  c.env.distractors = args.count("distractors") > 0;
  c.curriculum_start = args["curriculum"].as<int64_t>();
  if (c.curriculum_start < 0) usage_error("--curriculum must be 0 (off) or a starting delay, got " + std::to_string(c.curriculum_start));
  if (c.curriculum_start > 0 && c.env.task != "memory")
    usage_error("--curriculum is for --task memory, got --task " + c.env.task);
  c.curriculum_factor = args["curriculum-factor"].as<double>();
  if (!(c.curriculum_factor > 1 && c.curriculum_factor <= 1000))
    usage_error("--curriculum-factor must be in (1, 1000], got " + std::to_string(c.curriculum_factor));
  c.env.cards = args["cards"].as<int64_t>();
  if (c.env.cards < 2) usage_error("--cards must be at least 2, got " + std::to_string(c.env.cards));
  c.env.length = args["episode-length"].as<int64_t>();
  for (int64_t h : c.horizons)
    if (c.env.task == "repeat-previous" && c.env.length > 0 && c.env.length <= h)
      usage_error("--episode-length (" + std::to_string(c.env.length) + ") must exceed the lag (" + std::to_string(h) + ")");

  c.policy.width = positive("width");
  c.policy.layers = positive("layers");
  c.policy.d_state = positive("d-state");
  c.policy.dt_min = args["dt-min"].as<double>();
  c.policy.dt_max = args["dt-max"].as<double>();
  c.policy.bc_init_scale = args["bc-init-scale"].as<double>();
  if (const std::string m = args["gru-memory"].as<std::string>(); m == "auto") {
    c.gru_memory_auto = true;
  } else if (m != "off") {
    char* end = nullptr;
    c.policy.gru_memory = std::strtod(m.c_str(), &end);
    if (m.empty() || *end != '\0' || !(c.policy.gru_memory > 2))
      usage_error("--gru-memory must be auto, off or a number of steps above 2, got '" + m + "'");
  }
  if (!(c.policy.bc_init_scale > 0)) usage_error("--bc-init-scale must be positive, got " + std::to_string(c.policy.bc_init_scale));
  if (!(c.policy.dt_min > 0 && c.policy.dt_min <= c.policy.dt_max))
    usage_error("need 0 < --dt-min <= --dt-max, got " + std::to_string(c.policy.dt_min) + " and " +
                std::to_string(c.policy.dt_max));

  auto& p = c.ppo;
  p.rollout_len = positive("rollout-len");
  p.epochs = positive("epochs");
  p.minibatches = positive("minibatches");
  if (c.env.num_envs % p.minibatches != 0)
    usage_error("--minibatches (" + std::to_string(p.minibatches) + ") must divide --num-envs (" +
                std::to_string(c.env.num_envs) + "): each minibatch is a fixed group of environments");
  auto in_range = [&](const char* flag, double lo, double hi) {
    const double v = args[flag].as<double>();
    if (!(v >= lo && v <= hi)) usage_error(std::string("--") + flag + " must be in [" + fixed(lo, 3) + ", " + fixed(hi, 3) + "], got " + std::to_string(v));
    return v;
  };
  p.lr = in_range("lr", 1e-8, 1.0);
  p.gamma = in_range("gamma", 0, 1);
  p.gae_lambda = in_range("gae-lambda", 0, 1);
  p.clip = in_range("clip", 1e-3, 10);
  p.value_coef = in_range("value-coef", 0, 1e3);
  p.entropy_coef = in_range("entropy-coef", 0, 1e3);
  p.max_grad_norm = in_range("max-grad-norm", 1e-6, 1e6);
  p.normalize_advantages = one_of("advantage-norm", {"std", "off"}) == "std";
  p.skip_grad_spikes = args["skip-grad-spikes"].as<double>();
  if (!(p.skip_grad_spikes == 0 || (p.skip_grad_spikes > 1 && p.skip_grad_spikes <= 1e6)))
    usage_error("--skip-grad-spikes must be 0 (off) or a factor in (1, 1e6], got " + std::to_string(p.skip_grad_spikes));
  p.stepwise_replay = one_of("replay", {"step", "chunk"}) == "step";
  p.grad_chunks = args["grad-chunks"].as<int64_t>();  // 0: per horizon, in train()
  if (p.grad_chunks < 0) usage_error("--grad-chunks must be 0 (automatic) or positive, got " + std::to_string(p.grad_chunks));
  p.accuracy_window = positive("accuracy-window");
  p.record_parameter_grad_norms = args.count("grad-norms") > 0;
  p.seed = args["seed"].as<uint64_t>();

  c.throughput_steps = positive("throughput-steps");
  c.stop_at = in_range("stop-at", 0, 1);
  c.curriculum_threshold = in_range("curriculum-threshold", 0, 1);
  c.time_limit = in_range("time-limit", 0, 1e9);
  c.cuda_graph = args.count("cuda-graph") > 0;
  c.decode_step = args.count("decode-step") > 0;
  if (c.decode_step && c.mode != "throughput") usage_error("--decode-step is for --mode throughput");
  if (c.cuda_graph && c.mode != "throughput") usage_error("--cuda-graph is for --mode throughput");
  c.total_updates = positive("total-updates");
  if (args.count("lr-anneal")) p.lr_anneal_updates = c.total_updates;
  c.checkpoint_every = positive("checkpoint-every");
  c.out = args["out"].as<std::string>();
  c.resume = args.count("resume") > 0;
  c.report_only = args.count("report-only") > 0;
  const std::string device = args["device"].as<std::string>();
  if (device == "auto") {
    c.device = torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  } else {
    try {
      c.device = torch::Device(device);
    } catch (const c10::Error&) {
      usage_error("--device must be cpu, cuda, cuda:N or auto, got '" + device + "'");
    }
    if (c.device.is_cuda() && !torch::cuda::is_available())
      usage_error("--device " + device + ": no CUDA device is visible to this torch");
    if (!c.device.is_cpu() && !c.device.is_cuda()) usage_error("--device must be cpu, cuda, cuda:N or auto, got '" + device + "'");
  }
  if (c.cuda_graph && !c.device.is_cuda())
    usage_error("--cuda-graph needs a CUDA device, but the run is on " + c.device.str());
  if (const int threads = args["threads"].as<int>(); threads > 0) torch::set_num_threads(threads);
  return c;
}

json config_json(const Config& c, const std::string& controller, int64_t horizon) {
  const auto& p = c.ppo;
  return {{"controller", controller},
          {"task", c.env.task},
          {"horizon", horizon},
          {"num_bits", c.env.num_bits},
          {"distractors", c.env.distractors},
          {"curriculum", c.curriculum_start > 0 ? json{{"start", c.curriculum_start}, {"factor", c.curriculum_factor},
                                                        {"threshold", c.curriculum_threshold}}
                                                  : json(nullptr)},
          {"num_envs", c.env.num_envs},
          {"width", c.policy.width},
          {"layers", c.policy.layers},
          {"d_state", c.policy.d_state},
          {"dt_min", c.policy.dt_min},
          {"dt_max", c.policy.dt_max},
          {"bc_init_scale", c.policy.bc_init_scale},
          {"gru_memory", c.gru_memory_auto ? json("auto") : json(c.policy.gru_memory)},
          {"rollout_len", p.rollout_len},
          {"epochs", p.epochs},
          {"minibatches", p.minibatches},
          {"lr", p.lr},
          {"lr_anneal_updates", p.lr_anneal_updates},
          {"gamma", p.gamma},
          {"gae_lambda", p.gae_lambda},
          {"clip", p.clip},
          {"value_coef", p.value_coef},
          {"entropy_coef", p.entropy_coef},
          {"max_grad_norm", p.max_grad_norm},
          {"skip_grad_spikes", p.skip_grad_spikes},
          {"advantage_norm", p.normalize_advantages ? "std" : "off"},
          {"replay", p.stepwise_replay ? "step" : "chunk"},
          {"grad_chunks", p.grad_chunks},
          {"accuracy_window", p.accuracy_window},
          {"total_updates", c.total_updates},
          {"seed", p.seed},
          {"device", c.device.str()}};
}

// ---- progress ---------------------------------------------------------------------------------------

// One line per run: redrawn in place on a terminal, printed every few percent otherwise (logs).
class Progress {
 public:
  Progress(std::string name, int64_t total) : name_(std::move(name)), total_(total), tty_(::isatty(STDOUT_FILENO)) {}

  void show(const rl::UpdateStats& s, double seconds_per_update, const std::string& stage = "") {
    const int64_t every = std::max<int64_t>(1, total_ / 20);
    if (!tty_ && s.update % every != 0 && s.update != total_) return;
    constexpr int kBar = 24;
    const int filled = static_cast<int>(kBar * s.update / total_);
    std::ostringstream line;
    line << name_ << " [" << std::string(filled, '#') << std::string(kBar - filled, '.') << "] " << s.update << "/"
         << total_ << stage << "  acc " << fixed(s.accuracy, 3) << "  return " << fixed(s.mean_return, 3) << "  "
         << rate(s.steps_per_second) << " env-steps/s  ETA " << duration(seconds_per_update * (total_ - s.update));
    if (tty_) std::cout << "\r" << line.str() << "\033[K" << std::flush;
    else std::cout << line.str() << std::endl;
  }
  void finish() {
    if (tty_) std::cout << std::endl;
  }

 private:
  std::string name_;
  int64_t total_;
  bool tty_;
};

// ---- outputs ----------------------------------------------------------------------------------------

void write_metrics(const Config& c, const RunResult& r) {
  std::ostringstream csv;
  const auto header = rl::UpdateStats().fields();
  for (size_t i = 0; i < header.size(); ++i) csv << (i ? "," : "") << header[i].first;
  csv << "\n";
  json history = json::array();
  for (const auto& s : r.history) {
    json row;
    const auto fields = s.fields();
    for (size_t i = 0; i < fields.size(); ++i) {
      csv << (i ? "," : "") << fixed(fields[i].second, 6);
      row[fields[i].first] = std::isnan(fields[i].second) ? json(nullptr) : json(fields[i].second);
    }
    csv << "\n";
    history.push_back(row);
  }
  json doc = {{"run", r.name}, {"config", config_json(c, r.controller, r.horizon)}, {"history", history}};
  write_file(c.out + "/" + r.name + ".csv", csv.str());
  write_file(c.out + "/" + r.name + ".json", doc.dump(1) + "\n");
}

// The best accuracy over a full window of answers (a few early answers are no measure) on the task
// asked for (not on a curriculum's easier stages).
double best_accuracy(const Config& c, const RunResult& r) {
  double best = std::numeric_limits<double>::quiet_NaN();
  for (const auto& s : r.history)
    if (s.window_answers >= c.ppo.accuracy_window && s.episode_length == r.episode_length && !std::isnan(s.accuracy) &&
        !(s.accuracy <= best))
      best = s.accuracy;
  return best;
}

void write_plot(const Config& c, const std::vector<RunResult>& runs, const std::string& path) {
  std::vector<rl::Series> series;
  for (const auto& r : runs) {
    rl::Series s;
    s.label = r.controller + " H=" + std::to_string(r.horizon);
    s.dashed = r.controller == "gru";
    // One colour per horizon, the controllers told apart by solid and dashed lines.
    s.color = static_cast<int>(std::find(c.horizons.begin(), c.horizons.end(), r.horizon) - c.horizons.begin());
    for (const auto& h : r.history) s.x.push_back(static_cast<double>(h.update)), s.y.push_back(h.accuracy);
    series.push_back(std::move(s));
  }
  rl::PlotOptions o;
  o.title = c.env.task == "memory" ? std::to_string(c.env.num_bits) + "-bit delayed memory, " + std::to_string(c.env.num_envs) + " envs"
                                   : "repeat-previous, " + std::to_string(c.env.cards) + " cards";
  o.x_label = "PPO update";
  o.y_label = "accuracy";
  o.y_min = 0, o.y_max = 1;
  rl::plot_lines(path, series, o);
}

void write_table(const Config& c, const std::vector<RunResult>& runs) {
  std::ostringstream md, csv;
  md << "| controller | horizon | final accuracy | best accuracy | updates | env steps | time | env steps/s |\n"
     << "|---|---:|---:|---:|---:|---:|---:|---:|\n";
  csv << "controller,horizon,final_accuracy,best_accuracy,updates,env_steps,seconds,env_steps_per_second\n";
  for (const auto& r : runs) {
    double seconds = 0;
    for (const auto& s : r.history) seconds += s.seconds;
    const rl::UpdateStats last = r.history.empty() ? rl::UpdateStats() : r.history.back();
    const double sps = seconds > 0 ? last.env_steps / seconds : 0;
    md << "| " << r.controller << " | " << r.horizon << " | " << fixed(last.accuracy, 3) << " | "
       << fixed(best_accuracy(c, r), 3) << " | " << last.update << " | " << last.env_steps << " | " << duration(seconds)
       << " | " << rate(sps) << " |\n";
    csv << r.controller << "," << r.horizon << "," << fixed(last.accuracy, 4) << "," << fixed(best_accuracy(c, r), 4)
        << "," << last.update << "," << last.env_steps << "," << fixed(seconds, 1) << "," << fixed(sps, 1) << "\n";
  }
  write_file(c.out + "/results.md", md.str());
  write_file(c.out + "/results.csv", csv.str());
}

// ---- one run ----------------------------------------------------------------------------------------

// episode_length: of the task asked for (a curriculum starts shorter).
rl::PolicyOptions policy_options_for(const Config& c, const std::string& controller, int64_t episode_length) {
  rl::PolicyOptions p = c.policy;
  p.controller = controller;
  if (c.gru_memory_auto) p.gru_memory = 2.0 * static_cast<double>(episode_length);
  return p;
}

RunResult train(const Config& c, const std::string& controller, int64_t horizon) {
  rl::EnvOptions env_options = c.env;
  env_options.horizon = horizon;
  const bool curriculum = c.curriculum_start > 0 && c.curriculum_start < horizon;
  if (curriculum) env_options.curriculum_start = c.curriculum_start;  // the delay grows to `horizon` in stages
  torch::manual_seed(c.ppo.seed);  // the policy's initialisation
  auto env = rl::make_env(env_options, c.device, c.ppo.seed);
  const int64_t episode_length = curriculum ? horizon + 2 : env->episode_length();  // of the task asked for
  RunResult result{controller + "-h" + std::to_string(horizon), controller, horizon, episode_length, {}};
  auto policy = rl::make_policy(policy_options_for(c, controller, episode_length), env->obs_dim(), env->num_actions());
  const std::string env_name = env->name(), policy_name = policy->describe();
  rl::PPOOptions ppo = c.ppo;
  if (ppo.grad_chunks == 0) ppo.grad_chunks = (horizon + 2 + ppo.rollout_len - 1) / ppo.rollout_len + 1;
  rl::PPOTrainer trainer(std::move(env), policy, ppo);

  const std::string checkpoint = c.out + "/checkpoint-" + result.name + ".pt";
  if (c.report_only && !file_exists(checkpoint))
    throw std::runtime_error("--report-only: no checkpoint " + checkpoint + " for run " + result.name);
  if ((c.resume || c.report_only) && file_exists(checkpoint)) {
    trainer.load(checkpoint);
    std::cout << "resumed " << result.name << " from " << checkpoint << " at update " << trainer.history().size() << "\n";
  }
  std::cout << result.name << ": " << policy_name << " on " << env_name << ", " << c.env.num_envs << " envs x "
            << c.ppo.rollout_len << " steps per update, " << c.device << std::endl;

  auto* memory = dynamic_cast<rl::DelayedMemoryEnv*>(&trainer.env());
  auto stage = [&] { return curriculum ? "  H " + std::to_string(memory->delay()) : std::string(); };
  Progress progress(result.name, c.total_updates);
  // --grad-norms: rows of update, step, then one column per parameter; rewritten whole at each
  // checkpoint and at the end, so the file is never half a row.
  std::ostringstream grad_norms;
  const std::string grad_norms_path = c.out + "/" + result.name + "-grad-norms.csv";
  if (c.ppo.record_parameter_grad_norms) {
    grad_norms << "update,step";
    for (const auto& name : trainer.parameter_names()) grad_norms << "," << name;
    grad_norms << "\n";
  }
  double seconds = 0;
  int64_t timed = 0;
  const int64_t total_updates = c.report_only ? static_cast<int64_t>(trainer.history().size()) : c.total_updates;
  for (int64_t u = static_cast<int64_t>(trainer.history().size()); u < total_updates; ++u) {
    const rl::UpdateStats s = trainer.update();
    seconds += s.seconds, ++timed;
    progress.show(s, seconds / timed, stage());
    if (c.ppo.record_parameter_grad_norms) {
      const at::Tensor& norms = trainer.parameter_grad_norms();
      const auto n = norms.accessor<double, 2>();
      for (int64_t step = 0; step < norms.size(0); ++step) {
        grad_norms << s.update << "," << step;
        for (int64_t k = 0; k < norms.size(1); ++k) grad_norms << "," << n[step][k];
        grad_norms << "\n";
      }
    }
    const bool full_window = s.window_answers >= c.ppo.accuracy_window;
    if (curriculum && memory->delay() < horizon && full_window && s.accuracy >= c.curriculum_threshold) {
      const int64_t from = memory->delay();
      const auto grown = static_cast<int64_t>(std::llround(static_cast<double>(from) * c.curriculum_factor));
      memory->set_delay(std::min(horizon, std::max(from + 1, grown)));
      trainer.restart_statistics();
      progress.finish();
      std::cout << result.name << ": accuracy " << fixed(s.accuracy, 3) << " at delay " << from << " after update "
                << s.update << ": the delay is now " << memory->delay() << std::endl;
    }
    // Early ends: the target accuracy reached (over a full window of answers on the task asked
    // for), or the time used up.
    std::string stop;
    if (c.stop_at > 0 && full_window && s.episode_length == episode_length && s.accuracy >= c.stop_at)
      stop = "reached accuracy " + fixed(c.stop_at, 2);
    else if (c.time_limit > 0 && seconds + seconds / timed > c.time_limit)  // the next update would pass it
      stop = "time limit of " + duration(c.time_limit);
    const bool last = u + 1 == c.total_updates || !stop.empty();
    if (last || (u + 1) % c.checkpoint_every == 0 || g_interrupted) {
      trainer.save(checkpoint);
      if (c.ppo.record_parameter_grad_norms) write_file(grad_norms_path, grad_norms.str());
    }
    if (!stop.empty()) {
      progress.finish();
      std::cout << result.name << ": stopped after update " << s.update << ": " << stop << std::endl;
      break;
    }
    if (g_interrupted && !last) {
      progress.finish();
      std::cout << "interrupted: checkpoint " << checkpoint << " (continue with --resume)" << std::endl;
      result.interrupted = true;
      break;
    }
  }
  progress.finish();
  result.history = trainer.history();
  write_metrics(c, result);
  return result;
}

// ---- throughput -----------------------------------------------------------------------------------

json throughput(const Config& c) {
  json results = json::array();
  for (const auto& controller : c.controllers) {
    rl::EnvOptions env_options = c.env;
    env_options.horizon = c.horizons[0];
    torch::manual_seed(c.ppo.seed);
    auto env = rl::make_env(env_options, c.device, c.ppo.seed);
    auto policy = rl::make_policy(policy_options_for(c, controller, env->episode_length()), env->obs_dim(), env->num_actions());
    rl::RolloutStepper stepper(std::move(env), policy, c.ppo.seed, c.decode_step);
    std::string capture_error;
    if (c.cuda_graph) {
      try {
        stepper.capture();
      } catch (const c10::Error& e) {  // reported, and this controller is measured eager instead
        capture_error = e.what_without_backtrace();
        std::cerr << controller << ": CUDA graph capture failed, measuring eager steps: " << capture_error << std::endl;
      }
    }
    const rl::ThroughputResult r = rl::measure_throughput(stepper, /*warmup=*/20, c.throughput_steps);
    std::cerr << controller << ": " << rate(r.env_steps_per_second) << " env-steps/s at " << r.num_envs << " envs"
              << (r.cuda_graph ? " (CUDA graph)" : "") << (r.decode ? " (decode ops)" : "") << std::endl;
    results.push_back({{"controller", controller}, {"policy", r.policy}, {"env", r.env}, {"device", r.device},
                       {"num_envs", r.num_envs}, {"steps", r.steps}, {"cuda_graph", r.cuda_graph}, {"decode_step", r.decode},
                       {"seconds", r.seconds}, {"env_steps_per_second", r.env_steps_per_second}});
    if (!capture_error.empty()) results.back()["cuda_graph_error"] = capture_error;
  }
  return {{"mode", "throughput"},
          {"what", "env step + policy step + action sampling + state resets, no learning"},
          {"threads", torch::get_num_threads()},
          {"results", results}};
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli = make_cli();
  Config c;
  try {
    const auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help({"run", "task", "policy", "ppo"}) << std::endl;
      return 0;
    }
    c = parse(args);
    make_dirs(c.out);
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "statemamba-rl: " << e.what() << statemamba::tools::option_of_bad_value(argc, argv, e.what())
              << "\n(statemamba-rl --help lists the options)" << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "statemamba-rl: " << e.what() << std::endl;
    return 2;
  }
  std::signal(SIGINT, [](int) { g_interrupted = true; });

  if (c.mode == "throughput") {
    try {
      const json doc = throughput(c);
      write_file(c.out + "/throughput.json", doc.dump(1) + "\n");
      std::cout << doc.dump(1) << std::endl;
      return 0;
    } catch (const c10::Error& e) {
      std::cerr << "statemamba-rl: " << e.what_without_backtrace() << std::endl;
      return 1;
    }
  }

  std::vector<RunResult> runs;
  try {
    for (int64_t h : c.horizons)
      for (const auto& controller : c.controllers) {
        runs.push_back(train(c, controller, h));
        if (runs.back().interrupted) break;
      }
    write_plot(c, runs, c.out + "/accuracy.png");
    if (c.mode == "scale") write_table(c, runs);
  } catch (const c10::Error& e) {
    std::cerr << "statemamba-rl: " << e.what_without_backtrace() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "statemamba-rl: " << e.what() << std::endl;
    return 1;
  }

  std::cout << "\n";
  for (const auto& r : runs) {
    double seconds = 0;
    for (const auto& s : r.history) seconds += s.seconds;
    const rl::UpdateStats last = r.history.empty() ? rl::UpdateStats() : r.history.back();
    std::cout << r.name << ": accuracy " << fixed(last.accuracy, 3) << " (best " << fixed(best_accuracy(c, r), 3)
              << ") after " << last.update << " updates, " << last.env_steps << " env steps, " << duration(seconds)
              << "  [" << c.out << "/" << r.name << ".csv]\n";
  }
  std::cout << "plot: " << c.out << "/accuracy.png" << std::endl;
  if (c.mode == "scale") std::cout << "table: " << c.out << "/results.md" << std::endl;
  return g_interrupted ? 130 : 0;
}
