#include "cpu_output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace fastreg {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPooledMinBytes = size_t{4} << 20;  // below this, faults are cheap

size_t pool_limit_bytes() {
  // Set but empty means unset, as for every FASTREG_* setting (fastreg/_loader.py checks the value).
  const char* env = std::getenv("FASTREG_CPU_POOL_MB");
  const long mb = env != nullptr && *env != '\0' ? std::strtol(env, nullptr, 10) : 1024;
  return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
}

struct Block {
  void* address;
  size_t size;
};

class PooledAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kPooledMinBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* address = take(size);
    if (address == nullptr) {
      address = std::aligned_alloc(kHugePage, size);
      TORCH_CHECK(address != nullptr, "fastreg: out of memory allocating ", size, " bytes");
      madvise(address, size, MADV_HUGEPAGE);  // a hint; harmless where THP is off
    }
    return {address, new Block{address, size}, &PooledAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static PooledAllocator& instance() {
    static auto* allocator = new PooledAllocator();  // never destroyed: tensors may outlive statics
    return *allocator;
  }

 private:
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    instance().keep_or_free(*block);
    delete block;
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* address = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    return address;
  }

  void keep_or_free(const Block& block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + block.size <= limit_) {
        free_[block.size].push_back(block.address);
        cached_ += block.size;
        return;
      }
    }
    std::free(block.address);
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;  // block size -> cached blocks
  size_t cached_ = 0;
  const size_t limit_ = pool_limit_bytes();
};

}  // namespace

at::Tensor empty_like_pooled(const at::Tensor& like, at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(like.is_non_overlapping_and_dense());
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &PooledAllocator::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

}  // namespace fastreg
