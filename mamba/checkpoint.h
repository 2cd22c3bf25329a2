#pragma once
// Pretrained Mamba language models on disk, in either of the two published layouts:
//
//   HF transformers   config.json (MambaConfig: hidden_size, num_hidden_layers, state_size, ...) and
//                     model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
//   mamba_ssm         config.json (d_model, n_layer, vocab_size, ssm_cfg, ...) and pytorch_model.bin
//                     (a torch.save zip archive of the state dict, torch >= 1.6; read by a small pickle
//                     reader of our own that builds tensors and dicts only and runs no code)
// The layout of config.json is recognised by its keys ("d_model": mamba_ssm's), the weights by the
// files present, in transformers' order: model.safetensors, model.safetensors.index.json,
// pytorch_model.bin. Either spelling of the embedding (backbone.embedding[s].weight) is accepted.
//
//   auto model = statemamba::load_pretrained("state-spaces/mamba-130m-hf", {at::kCPU, at::kFloat});
//   statemamba::save_pretrained(model, "out");  // transformers' MambaForCausalLM.from_pretrained reads it
//
// Vocabulary rows: mamba_ssm's config.json gives the tokenizer's vocab_size and the embedding has
// vocab_size rounded up to pad_vocab_size_multiple rows; an HF config's vocab_size is already the
// row count (50280 for state-spaces/*-hf, whose tokenizer has 50277 tokens). Our MambaConfig keeps
// vocab_size and pad_vocab_size_multiple so that padded_vocab_size() is the row count in both cases:
// from HF, vocab_size = the rows and pad_vocab_size_multiple = HF's value when it divides the rows,
// else 1. save_pretrained writes vocab_size = padded_vocab_size().
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <map>
#include <string>

#include "mamba/config.h"
#include "mamba/modules.h"

namespace statemamba {

struct LoadOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // float32, float64, bfloat16 or float16
};

// A model directory in the HF layout (config.json + model.safetensors or sharded with index) or the
// mamba_ssm layout (config.json + pytorch_model.bin); detected from the files present.
MambaConfig read_pretrained_config(const std::string& dir);

// The model with every parameter from the checkpoint, on options.device in options.dtype. Missing,
// unexpected and mis-shaped tensors are reported together in one c10::Error.
MambaLMHeadModel load_pretrained(const std::string& dir, const LoadOptions& options = {});

// HF layout (config.json in transformers' MambaConfig format + model.safetensors), atomic per file;
// creates `dir` if needed. Tensors are saved in the model's dtype. LayerNorm models (rms_norm off)
// are refused: transformers' Mamba has RMSNorm only.
void save_pretrained(MambaLMHeadModel& model, const std::string& dir);

// The checkpoint's tensors under our parameter names (HF's; mamba_ssm's backbone.embedding.weight
// renamed), as stored (CPU, stored dtype), for tools that inspect checkpoints.
std::map<std::string, at::Tensor> read_pretrained_tensors(const std::string& dir);

}  // namespace statemamba
