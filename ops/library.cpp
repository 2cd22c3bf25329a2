// The statemamba operator library. Each op defines its own schema next to its C++ entry point
// (ops/<op>.cpp, TORCH_LIBRARY_FRAGMENT); this is the library's one TORCH_LIBRARY block.
#include <torch/library.h>

TORCH_LIBRARY(statemamba, m) {}
