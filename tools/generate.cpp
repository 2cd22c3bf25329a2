// statemamba-generate: text generation, scoring and state "cartridges" with a pretrained Mamba.
//
//   statemamba-generate -m mamba-130m -i "The capital of France is" -n 20
//   statemamba-generate -m DIR --ids 12,7,391 -n 5 -t 0.8 --top-p 0.9 --seed 1     # ids in, ids out
//   statemamba-generate -m DIR -i "some text" --score --logits-out logits.safetensors
//   statemamba-generate -m DIR --build-state manual.txt --save-state manual.h5     # read once ...
//   statemamba-generate -m DIR --load-state manual.h5 -i "Q: how do I reset it? A:"  # ... ask often
//   statemamba-generate -m DIR -i "..." -n 500 -t 0.7 --checkpoint run.ckpt --checkpoint-every 50
//   statemamba-generate -m DIR -i "..." -n 500 -t 0.7 --resume run.ckpt             # same tokens
//
// Text goes to stdout as it comes; timings and notes go to stderr.
#include <torch/torch.h>

#include <chrono>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <sstream>
#include <sys/stat.h>

#include "mamba/checkpoint.h"
#include "mamba/generate.h"
#include "mamba/safetensors.h"
#include "mamba/state_library.h"
#include "mamba/tokenizer.h"
#include "tools/cli_errors.h"

using namespace statemamba;

namespace {

using Clock = std::chrono::steady_clock;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_file(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(std::string(flag) + ": cannot read '" + path + "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// "12,7,391" -> {12, 7, 391}; "1,2;3" -> two prompts.
std::vector<std::vector<int64_t>> parse_ids(const std::string& text) {
  if (!text.empty() && (text.back() == ';' || text.back() == ','))
    throw UsageError("--ids: '" + text + "' ends in '" + text.back() + "'; expected an id there");
  std::vector<std::vector<int64_t>> prompts;
  std::stringstream rows(text);
  for (std::string row; std::getline(rows, row, ';');) {
    std::vector<int64_t> ids;
    std::stringstream items(row);
    for (std::string item; std::getline(items, item, ',');) {
      size_t used = 0;
      int64_t id = -1;
      try {
        id = std::stoll(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      while (used < item.size() && std::isspace(static_cast<unsigned char>(item[used]))) ++used;
      if (item.find_first_not_of(" \t") == std::string::npos || used != item.size() || id < 0)
        throw UsageError("--ids: expected non-negative integers separated by ',' (and prompts by ';'), got '" +
                         item + "' in '" + text + "'");
      ids.push_back(id);
    }
    if (ids.empty()) throw UsageError("--ids: an empty prompt in '" + text + "'");
    prompts.push_back(ids);
  }
  if (prompts.empty()) throw UsageError("--ids: no ids given");
  return prompts;
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "float64" || name == "fp64") return at::kDouble;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw UsageError("--dtype: expected float32, bfloat16, float16 or float64, got '" + name + "'");
}

at::Device parse_device(const std::string& name) {
  std::optional<at::Device> device;
  try {
    device = at::Device(name);
  } catch (const c10::Error&) {
    throw UsageError("--device: expected cpu, cuda or cuda:N, got '" + name + "'");
  }
  if (device->is_cuda() && !torch::cuda::is_available())
    throw UsageError("--device " + name + ": no CUDA device is available to this program");
  if (!device->is_cpu() && !device->is_cuda()) throw UsageError("--device: expected cpu or cuda, got '" + name + "'");
  return *device;
}

// A state file (a path, or a name ending in .h5/.hdf5/.pt) or a library entry (a bare name).
bool names_a_file(const std::string& arg) {
  auto ends = [&](const std::string& ext) {
    return arg.size() >= ext.size() && arg.compare(arg.size() - ext.size(), ext.size(), ext) == 0;
  };
  return arg.find('/') != std::string::npos || ends(".h5") || ends(".hdf5") || ends(".pt");
}

// Prints decoded text as tokens come, holding back trailing U+FFFDs (a character whose bytes are
// split across tokens) until a later token completes it; finish() prints the rest as it is.
class TextStream {
 public:
  explicit TextStream(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}
  void push(int64_t id) {
    ids_.push_back(id);
    emit(false);
  }
  void finish() { emit(true); }

 private:
  void emit(bool all) {
    const std::string text = tokenizer_.decode(ids_);
    size_t end = text.size();
    static const std::string kReplacement = "\xEF\xBF\xBD";
    while (!all && end >= printed_ + 3 && text.compare(end - 3, 3, kReplacement) == 0) end -= 3;
    if (end > printed_) std::cout << text.substr(printed_, end - printed_) << std::flush;
    printed_ = std::max(printed_, end);
  }
  const Tokenizer& tokenizer_;
  std::vector<int64_t> ids_;
  size_t printed_ = 0;
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void sync(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("statemamba-generate",
                       "Generate with a pretrained Mamba (HF or mamba_ssm checkpoint directory), score text, and\n"
                       "save/load recurrent states. Text goes to stdout as it comes; timings to stderr.");
  // clang-format off
  cli.add_options("model")
      ("m,model", "model directory (config.json + model.safetensors or pytorch_model.bin)", cxxopts::value<std::string>())
      ("tokenizer", "tokenizer.json (default: the model directory's, if present)", cxxopts::value<std::string>())
      ("device", "cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("cpu"))
      ("dtype", "float32, bfloat16, float16 or float64", cxxopts::value<std::string>()->default_value("float32"))
      ("threads", "CPU threads (0: torch's default)", cxxopts::value<int>()->default_value("0"));
  cli.add_options("input")
      ("i,prompt", "prompt text (needs a tokenizer)", cxxopts::value<std::string>())
      ("f,file", "read the prompt text from this file", cxxopts::value<std::string>())
      ("ids", "prompt token ids, comma-separated (e.g. 12,7,391); ';' separates prompts of a batch; "
              "generated ids are printed comma-separated", cxxopts::value<std::string>())
      ("batch-file", "one prompt per line: a batch, decoded together", cxxopts::value<std::string>())
      ("prefill-chunk", "prompt tokens per forward (0: all at once)", cxxopts::value<int64_t>()->default_value("512"));
  cli.add_options("sampling")
      ("n,n-predict", "tokens to generate", cxxopts::value<int64_t>()->default_value("20"))
      ("t,temperature", "0: greedy", cxxopts::value<double>()->default_value("0.0"))
      ("top-k", "keep the k most likely tokens (0: off)", cxxopts::value<int64_t>()->default_value("0"))
      ("top-p", "keep the smallest set of tokens with this mass (1: off)", cxxopts::value<double>()->default_value("1.0"))
      ("repetition-penalty", "HF's: seen tokens' logits / p if positive, * p if negative (1: off)",
       cxxopts::value<double>()->default_value("1.0"))
      ("seed", "random seed", cxxopts::value<uint64_t>()->default_value("0"))
      ("eos", "stop a row at this id (default: the tokenizer's end-of-text, if any)", cxxopts::value<int64_t>())
      ("ignore-eos", "never stop before -n tokens");
  cli.add_options("scoring")
      ("score", "score the prompt instead of generating: print its perplexity")
      ("logits-out", "with --score: write the per-position logits (float32 [L, vocab], 'logits') to this "
                     ".safetensors file", cxxopts::value<std::string>());
  cli.add_options("states")
      ("build-state", "run the model over this text file and save the state (with --save-state or "
                      "--state-name); generates nothing", cxxopts::value<std::string>())
      ("load-state", "start from this state: a .h5/.pt file, or a name in the state library", cxxopts::value<std::string>())
      ("save-state", "save the final state (after prompt and generated tokens) to this .h5/.pt file",
       cxxopts::value<std::string>())
      ("state-name", "save the final state into the state library under this name", cxxopts::value<std::string>())
      ("state-dir", "the state library directory (default ~/.cache/statemamba/states)", cxxopts::value<std::string>())
      ("replace", "let --state-name replace an existing entry");
  cli.add_options("checkpoints")
      ("checkpoint", "save the generation (state, tokens, RNG, settings) to this file as it goes",
       cxxopts::value<std::string>())
      ("checkpoint-every", "tokens between checkpoints", cxxopts::value<int64_t>()->default_value("16"))
      ("resume", "continue the generation saved in this checkpoint (same command otherwise)", cxxopts::value<std::string>());
  cli.add_options()("h,help", "show this help");
  // clang-format on

  try {
    auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help({"", "model", "input", "sampling", "scoring", "states", "checkpoints"}) << std::endl;
      return 0;
    }
    if (!args.unmatched().empty()) throw UsageError("unexpected argument '" + args.unmatched()[0] + "'");
    if (!args.count("model")) throw UsageError("-m/--model DIR is required");
    const int inputs = args.count("prompt") + args.count("file") + args.count("ids") + args.count("batch-file") +
                       args.count("build-state");
    if (inputs != 1)
      throw UsageError("give exactly one of -i/--prompt, -f/--file, --ids, --batch-file or --build-state (got " +
                       std::to_string(inputs) + ")");
    const bool scoring = args.count("score"), building = args.count("build-state");
    if (args.count("logits-out") && !scoring) throw UsageError("--logits-out needs --score");
    if (building && !args.count("save-state") && !args.count("state-name"))
      throw UsageError("--build-state needs --save-state FILE or --state-name NAME to keep the state it builds");
    if (scoring && (args.count("save-state") || args.count("state-name") || args.count("checkpoint") ||
                    args.count("resume") || building))
      throw UsageError("--score does not combine with --build-state, --save-state, --state-name, --checkpoint or "
                       "--resume");
    if (args.count("save-state") && !names_a_file(args["save-state"].as<std::string>()))
      throw UsageError("--save-state: '" + args["save-state"].as<std::string>() +
                       "' must end in .h5, .hdf5 or .pt (use --state-name for the library)");
    if (args.count("state-name")) StateLibrary::check_name(args["state-name"].as<std::string>());
    const int64_t every = args["checkpoint-every"].as<int64_t>();
    if (every < 1) throw UsageError("--checkpoint-every must be at least 1, got " + std::to_string(every));
    if (args.count("resume") && !is_file(args["resume"].as<std::string>()))
      throw UsageError("--resume: no such file '" + args["resume"].as<std::string>() + "'");

    // Input files are read before the model loads, so a wrong name fails fast.
    std::vector<std::string> texts;
    if (args.count("prompt")) texts = {args["prompt"].as<std::string>()};
    if (args.count("file")) texts = {read_file(args["file"].as<std::string>(), "-f/--file")};
    if (building) texts = {read_file(args["build-state"].as<std::string>(), "--build-state")};
    if (args.count("batch-file")) {
      std::stringstream lines(read_file(args["batch-file"].as<std::string>(), "--batch-file"));
      for (std::string line; std::getline(lines, line);)
        if (!line.empty()) texts.push_back(line);
      if (texts.empty()) throw UsageError("--batch-file: no prompts (no non-empty lines)");
    }

    GenerationOptions options;
    options.max_new_tokens(building ? 0 : args["n-predict"].as<int64_t>())
        .prefill_chunk(args["prefill-chunk"].as<int64_t>())
        .sampling(SamplingOptions()
                      .temperature(args["temperature"].as<double>())
                      .top_k(args["top-k"].as<int64_t>())
                      .top_p(args["top-p"].as<double>())
                      .repetition_penalty(args["repetition-penalty"].as<double>())
                      .seed(args["seed"].as<uint64_t>()));
    options.validate();  // names the bad field before the model loads
    const at::Device device = parse_device(args["device"].as<std::string>());
    const at::ScalarType dtype = parse_dtype(args["dtype"].as<std::string>());
    if (args["threads"].as<int>() > 0) torch::set_num_threads(args["threads"].as<int>());

    // ---- the model and the tokenizer ----
    const std::string model_dir = args["model"].as<std::string>();
    auto t0 = Clock::now();
    MambaLMHeadModel model = load_pretrained(model_dir, {device, dtype});
    model->eval();
    std::cerr << "model: " << model_dir << " (" << model->options.n_layer() << " layers, d_model "
              << model->options.d_model() << ", " << args["dtype"].as<std::string>() << " on " << device
              << ") loaded in " << seconds_since(t0) << " s\n";
    std::optional<Tokenizer> tokenizer;
    const std::string tokenizer_path =
        args.count("tokenizer") ? args["tokenizer"].as<std::string>() : model_dir + "/tokenizer.json";
    if (args.count("tokenizer") || is_file(tokenizer_path)) tokenizer = Tokenizer::from_file(tokenizer_path);
    const bool text_mode = !args.count("ids");
    if (text_mode && !tokenizer)
      throw UsageError("text input needs a tokenizer, and '" + tokenizer_path +
                       "' does not exist (give --tokenizer FILE, or token ids with --ids)");
    if (tokenizer && tokenizer->vocab_size() < model->options.vocab_size())
      options.vocab_limit(tokenizer->vocab_size());  // the padding rows have no text
    if (!args.count("ignore-eos")) {
      if (args.count("eos")) options.eos_id(args["eos"].as<int64_t>());
      else if (tokenizer) options.eos_id(tokenizer->eos_id());
    }

    // ---- the prompts ----
    std::vector<std::vector<int64_t>> prompts;
    if (args.count("ids")) {
      prompts = parse_ids(args["ids"].as<std::string>());
    } else {
      for (const auto& text : texts) {
        prompts.push_back(tokenizer->encode(text));
        if (prompts.back().empty()) throw UsageError("the prompt encodes to no tokens; give some text");
      }
    }
    const int64_t batch = static_cast<int64_t>(prompts.size());
    if (scoring && batch != 1) throw UsageError("--score takes one prompt");

    // ---- the initial state ----
    std::optional<MambaStackState> initial;
    std::string context;
    StateLibrary library(args.count("state-dir") ? args["state-dir"].as<std::string>() : StateLibrary::default_dir());
    if (args.count("load-state")) {
      const std::string what = args["load-state"].as<std::string>();
      if (names_a_file(what)) {
        initial = MambaStackState::load(what, model->options);
      } else {
        initial = library.load(what, model->options);
        const StateInfo info = library.info(what);
        if (!info.weights.empty() && info.weights != weights_digest(model))
          std::cerr << "warning: state '" << what << "' was built with other weights (" << info.model << ", digest "
                    << info.weights << ") of this architecture\n";
      }
      if (initial->batch() != 1)
        throw UsageError("--load-state: '" + what + "' holds " + std::to_string(initial->batch()) +
                         " rows; a starting state must hold one");
      context = "initial state " + state_digest(*initial);
      std::cerr << "state: " << what << " (" << initial->tokens << " tokens read)\n";
    }

    // ---- scoring ----
    if (scoring) {
      t0 = Clock::now();
      const ScoreResult result = score(model, prompts[0], options.prefill_chunk(), initial ? &*initial : nullptr);
      const double s = seconds_since(t0);
      if (args.count("logits-out"))
        safetensors::save(args["logits-out"].as<std::string>(), {{"logits", result.logits}},
                          {{"model", model_dir}, {"tokens", std::to_string(prompts[0].size())}});
      std::cout << "perplexity: " << result.perplexity() << " (" << result.predicted
                << " predicted tokens, mean nll " << result.nll / result.predicted << ")" << std::endl;
      std::cerr << "scored " << prompts[0].size() << " tokens in " << s << " s ("
                << prompts[0].size() / s << " tokens/s)\n";
      return 0;
    }

    // ---- generation ----
    t0 = Clock::now();
    const bool resuming = args.count("resume");
    Generation generation =
        resuming ? Generation::resume(model, args["resume"].as<std::string>(), prompts, options, context)
                 : Generation(model, prompts, options, initial ? &*initial : nullptr, context);
    sync(device);
    int64_t prompt_tokens = 0;
    for (const auto& p : prompts) prompt_tokens += static_cast<int64_t>(p.size());
    const double prefill_s = seconds_since(t0);
    if (resuming)
      std::cerr << "resumed from " << args["resume"].as<std::string>() << " after " << generation.steps()
                << " tokens\n";
    else if (!prompts.empty())
      std::cerr << "prefill: " << prompt_tokens << " tokens in " << prefill_s << " s ("
                << prompt_tokens / prefill_s << " tokens/s)\n";

    // Output: batch 1 streams (text, or ids comma-separated); a batch prints each row at the end.
    const bool streaming = batch == 1 && !building;
    std::optional<TextStream> stream;
    int64_t printed_ids = 0;
    auto on_token = [&](int64_t row, int64_t id) {
      if (!streaming) return;
      if (stream) {
        stream->push(id);
      } else {
        std::cout << (printed_ids++ ? "," : "") << id << std::flush;
      }
    };
    if (streaming) {
      if (text_mode) {
        std::cout << texts[0] << std::flush;
        stream.emplace(*tokenizer);
      }
      for (int64_t id : generation.generated()[0]) on_token(0, id);  // what a resumed run had made
    }
    const int64_t steps_before = generation.steps();
    t0 = Clock::now();
    generation.run(on_token, args.count("checkpoint") ? args["checkpoint"].as<std::string>() : "", every);
    sync(device);
    const double decode_s = seconds_since(t0);
    if (streaming) {
      if (stream) stream->finish();
      std::cout << std::endl;
    } else if (!building) {
      for (int64_t b = 0; b < batch; ++b) {
        const auto& ids = generation.generated()[b];
        if (text_mode) {
          std::cout << "--- " << b << " ---\n" << texts[b] << tokenizer->decode(ids) << "\n";
        } else {
          for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? "," : "") << ids[i];
          std::cout << "\n";
        }
      }
      std::cout << std::flush;
    }
    const int64_t decoded = generation.steps() - steps_before;
    if (decoded > 0)
      std::cerr << "decode: " << decoded << " steps x " << batch << " rows in " << decode_s << " s ("
                << decoded * batch / decode_s << " tokens/s)\n";

    // ---- saving the state ----
    if (args.count("save-state") || args.count("state-name")) {
      const MambaStackState final_state = generation.state().to(at::kCPU);
      if (args.count("save-state")) {
        final_state.save(args["save-state"].as<std::string>());
        std::cerr << "saved the state (" << final_state.tokens << " tokens) to " << args["save-state"].as<std::string>()
                  << "\n";
      }
      if (args.count("state-name")) {
        StateInfo info;
        info.source = building ? args["build-state"].as<std::string>()
                      : args.count("file") ? args["file"].as<std::string>()
                                           : (text_mode ? "prompt" : "ids");
        info.model = model_dir;
        info.weights = weights_digest(model);
        const StateInfo stored =
            library.add(args["state-name"].as<std::string>(), final_state, info, args.count("replace") > 0);
        std::cerr << "saved the state (" << stored.tokens << " tokens) as '" << stored.name << "' in "
                  << library.dir() << "\n";
      }
    }
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "statemamba-generate: " << e.what() << "\n(see --help)" << std::endl;
    return 2;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "statemamba-generate: " << e.what() << tools::option_of_bad_value(argc, argv, e.what())
              << "\n(see --help)" << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "statemamba-generate: error: " << e.what_without_backtrace() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "statemamba-generate: error: " << e.what() << std::endl;
    return 1;
  }
}
