#include "mamba/derived_tensor.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

namespace statemamba {

DerivedTensor& DerivedTensor::operator=(const DerivedTensor& other) {
  if (this != &other) {
    std::lock_guard<std::mutex> lock(mutex_);
    entry_.reset();
  }
  return *this;
}

bool DerivedTensor::matches(const Entry& e, const at::Tensor& source, int64_t tag) const {
  const at::Tensor& grad = source.grad();
  const bool same_grad = grad.defined() ? e.grad && !e.grad->expired() &&
                                              e.grad->_unsafe_get_target() == grad.unsafeGetTensorImpl() &&
                                              e.grad_version == grad._version()
                                        : !e.grad;
  return !e.storage.expired() && e.storage._unsafe_get_target() == source.storage().unsafeGetStorageImpl() &&
         e.data == source.data_ptr() && e.version == source._version() && same_grad &&
         e.dtype == source.scalar_type() &&
         e.device == source.device() && e.tag == tag &&
         // a value made in inference mode cannot be saved for a backward outside it
         (!e.value.is_inference() || c10::InferenceMode::is_enabled());
}

at::Tensor DerivedTensor::get(const at::Tensor& source, int64_t tag, const Derive& derive) {
  const bool reusable = !source.is_inference() && !(at::GradMode::is_enabled() && source.requires_grad());
  if (!reusable) return derive(source);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!entry_ || !matches(*entry_, source, tag)) {
    const at::Tensor& grad = source.grad();
    entry_ = Entry{source.storage().getWeakStorageImpl(),
                   source.data_ptr(),
                   source._version(),
                   grad.defined() ? std::optional<WeakImpl>(WeakImpl(grad.getIntrusivePtr())) : std::nullopt,
                   grad.defined() ? grad._version() : 0,
                   source.scalar_type(),
                   source.device(),
                   tag,
                   derive(source)};
  }
  return entry_->value;
}

}  // namespace statemamba
