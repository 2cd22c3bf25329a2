#include "mamba/cuda_graph_decoder.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/utils.h>

#ifdef STATEMAMBA_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace statemamba {

struct CudaGraphDecoder::Impl {
  MambaLMHeadModel model{nullptr};
  int64_t batch = 0;
  at::Device device = at::kCPU;
  MambaStackState state;          // the graph reads and advances these tensors in place
  at::Tensor ids, reset, logits;  // the graph's input and output buffers
  bool reset_pending = false;     // `reset` may hold a true from the last step
#ifdef STATEMAMBA_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;  // made once the model is known to be on a GPU
#endif
};

namespace {

void check_rows(const at::Tensor& t, int64_t batch, bool ids, const char* name) {
  const bool dtype_ok = t.defined() && (ids ? (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt)
                                            : t.scalar_type() == at::kBool);
  TORCH_CHECK(dtype_ok && t.dim() == 1 && t.size(0) == batch, "CudaGraphDecoder::step: argument '", name,
              "' must be ", ids ? "an int64" : "a bool", " tensor of shape [batch] = [", batch, "], got ",
              t.defined() ? c10::toString(t.scalar_type()) : "undefined", " ", t.defined() ? t.sizes() : at::IntArrayRef{});
}

}  // namespace

CudaGraphDecoder::CudaGraphDecoder(MambaLMHeadModel model, int64_t batch) : impl_(std::make_unique<Impl>()) {
  TORCH_CHECK(!model.is_empty(), "CudaGraphDecoder: argument 'model' is an empty module holder");
  TORCH_CHECK(batch >= 1, "CudaGraphDecoder: argument 'batch' must be at least 1, got ", batch);
  const at::Device device = model->backbone->embeddings->weight.device();
#ifndef STATEMAMBA_WITH_CUDA
  TORCH_CHECK(false, "CudaGraphDecoder: this build of statemamba has no CUDA support (configure with "
                     "-DSTATEMAMBA_CUDA=ON); the model is on ", device);
#else
  TORCH_CHECK(device.is_cuda(), "CudaGraphDecoder: the model must be on a CUDA device (model->to(torch::kCUDA)), "
                                "but its parameters are on ", device);
  Impl& m = *impl_;
  m.model = model, m.batch = batch, m.device = device;
  c10::cuda::CUDAGuard device_guard(device);
  torch::NoGradGuard no_grad;
  m.state = MambaStackState::zeros(model->options, batch, device, model->state_dtype());
  m.ids = at::zeros({batch}, at::TensorOptions(device).dtype(at::kLong));
  m.reset = at::zeros({batch}, at::TensorOptions(device).dtype(at::kBool));
  // Capture on a side stream (the default stream cannot capture), after warm-up steps on a scratch
  // state there: cuBLAS handles and workspaces and any lazy set-up happen outside the capture.
  auto capture_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
  c10::cuda::getCurrentCUDAStream(device.index()).synchronize();  // the buffers above are written
  {
    c10::cuda::CUDAStreamGuard stream_guard(capture_stream);
    MambaStackState scratch = m.state.clone();
    for (int i = 0; i < 2; ++i) model->step(m.ids, scratch, m.reset);
    capture_stream.synchronize();
    m.graph = std::make_unique<at::cuda::CUDAGraph>();
    m.graph->capture_begin();
    m.logits = model->step(m.ids, m.state, m.reset);
    m.graph->capture_end();
    capture_stream.synchronize();
  }
  m.state.tokens = 0;  // capturing ran step() on the host once, but no kernel
#endif
}

CudaGraphDecoder::~CudaGraphDecoder() = default;
CudaGraphDecoder::CudaGraphDecoder(CudaGraphDecoder&&) noexcept = default;
CudaGraphDecoder& CudaGraphDecoder::operator=(CudaGraphDecoder&&) noexcept = default;

int64_t CudaGraphDecoder::batch() const { return impl_->batch; }

at::Tensor CudaGraphDecoder::step(const at::Tensor& input_ids, const std::optional<at::Tensor>& reset) {
  TORCH_CHECK(impl_, "CudaGraphDecoder::step: this decoder was moved from");
  Impl& m = *impl_;
  check_rows(input_ids, m.batch, /*ids=*/true, "input_ids");
  if (reset) check_rows(*reset, m.batch, /*ids=*/false, "reset");
  if (input_ids.device().is_cpu() && input_ids.numel() > 0) {
    // Ids on the host are cheap to check; a bad id on the device fails as in model->step().
    const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
    const int64_t rows = m.model->options.padded_vocab_size();
    TORCH_CHECK(lo >= 0 && hi < rows, "CudaGraphDecoder::step: argument 'input_ids' holds id ", lo < 0 ? lo : hi,
                ", outside the embedding's [0, ", rows, ")");
  }
#ifdef STATEMAMBA_WITH_CUDA
  c10::cuda::CUDAGuard device_guard(m.device);
  m.ids.copy_(input_ids, /*non_blocking=*/true);
  if (reset) {
    m.reset.copy_(*reset, /*non_blocking=*/true);
    m.reset_pending = true;
  } else if (m.reset_pending) {
    m.reset.zero_();
    m.reset_pending = false;
  }
  m.graph->replay();
  m.state.tokens += 1;
#endif
  return m.logits;
}

MambaStackState CudaGraphDecoder::state() const {
  TORCH_CHECK(impl_, "CudaGraphDecoder::state: this decoder was moved from");
  return impl_->state.clone();
}

void CudaGraphDecoder::set_state(const MambaStackState& state) {
  TORCH_CHECK(impl_, "CudaGraphDecoder::set_state: this decoder was moved from");
  Impl& m = *impl_;
  state.validate_for(m.model->options);  // layers, shapes, fingerprint
  TORCH_CHECK(state.batch() == m.batch, "CudaGraphDecoder::set_state: the state has batch ", state.batch(),
              " but this decoder was captured for batch ", m.batch);
  TORCH_CHECK(state.dtype() == m.state.dtype(), "CudaGraphDecoder::set_state: the state is ", state.dtype(),
              " but this model's state is ", m.state.dtype());
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < m.state.layers.size(); ++i) {
    m.state.layers[i].conv_state.copy_(state.layers[i].conv_state);
    m.state.layers[i].ssm_state.copy_(state.layers[i].ssm_state);
  }
  m.state.tokens = state.tokens;
}

void CudaGraphDecoder::reset_state() {
  TORCH_CHECK(impl_, "CudaGraphDecoder::reset_state: this decoder was moved from");
  for (auto& layer : impl_->state.layers) {
    layer.conv_state.zero_();
    layer.ssm_state.zero_();
  }
  impl_->state.tokens = 0;
}

}  // namespace statemamba
