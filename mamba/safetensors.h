#pragma once
// The safetensors format (https://github.com/huggingface/safetensors), read and written without the
// Rust library: an 8-byte little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
// then the tensors' bytes, offsets relative to the end of the header.
//
//   auto tensors = statemamba::safetensors::load("model.safetensors");   // name -> CPU tensor
//   statemamba::safetensors::save("out.safetensors", tensors, {{"format", "pt"}});
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

namespace statemamba::safetensors {

// Every tensor in the file, in its stored dtype, on CPU (copied out of a read-only mmap).
// Hostile files (header length past EOF or over 100 MB, bad JSON, offsets out of range or
// overlapping, unknown dtype, shape/byte-count mismatch) raise c10::Error naming the file and problem.
// Dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
std::map<std::string, at::Tensor> load(const std::string& path);

// The file's "__metadata__" (string -> string), empty when it has none; validates the whole header.
std::map<std::string, std::string> load_metadata(const std::string& path);

// Writes atomically (temp file + rename); tensors are made contiguous CPU; metadata -> "__metadata__".
// The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
void save(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
          const std::map<std::string, std::string>& metadata = {});

// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it over `path`, so
// readers see the old file or the new one, never half of one. `what` names the caller in errors.
void write_file_atomically(const std::string& path, const std::string& bytes, const char* what);

}  // namespace statemamba::safetensors
