#pragma once
// A tensor computed from one parameter (A = -exp(A_log), a weight cast to float32), kept while the
// parameter is unchanged so that inference does not recompute it on every forward. Internal to
// the modules.
#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/UndefinedTensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <functional>
#include <mutex>
#include <optional>

namespace statemamba {

class DerivedTensor {
 public:
  using Derive = std::function<at::Tensor(const at::Tensor&)>;

  DerivedTensor() = default;
  // A copy (a cloned module, whose parameters are other tensors) starts empty.
  DerivedTensor(const DerivedTensor&) {}
  DerivedTensor& operator=(const DerivedTensor&);

  // derive(source), reused while source keeps its storage, data pointer, version counter (bumped
  // by in-place writes: copy_, load_state_dict, Adam's steps), gradient (its tensor and version:
  // libtorch's SGD writes through .data(), which bumps no version, but a step follows a backward
  // that changed the gradient), dtype and device, and `tag` (whatever else the result depends on,
  // e.g. the dtype it is cast to). Reused only where that cannot change autograd: grad mode off,
  // or a source that does not require grad. Otherwise, and for inference tensors (which have no
  // version counter), derive(source) every call.
  // Not seen: a write through .data() with no gradient change since the value was derived (e.g. a
  // no-grad forward between backward and an SGD step, or a user's p.data().copy_(...)).
  at::Tensor get(const at::Tensor& source, int64_t tag, const Derive& derive);

 private:
  // Weak references: an address is not reused while one is held.
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    int64_t version;
    std::optional<WeakImpl> grad;  // none while the gradient is undefined
    int64_t grad_version;
    at::ScalarType dtype;
    at::Device device;
    int64_t tag;
    at::Tensor value;
  };
  bool matches(const Entry& e, const at::Tensor& source, int64_t tag) const;

  std::mutex mutex_;  // modules may run forward from several threads
  std::optional<Entry> entry_;
};

}  // namespace statemamba
