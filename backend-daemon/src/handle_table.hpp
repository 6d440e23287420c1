// Objects a guest names by handle: an index plus a generation, so a stale or
// forged handle finds nothing (see VIBIF handles in vibif.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "vib/vibif.h"

namespace vib::backend {

template <typename T>
class HandleTable {
 public:
  explicit HandleTable(std::size_t limit) : limit_(std::min<std::size_t>(limit, 0xffff)) {}

  // VIBIF_HANDLE_NONE when the table is full.
  vibif_handle_t insert(std::unique_ptr<T> object) {
    std::uint32_t index;
    if (!free_.empty()) {
      index = free_.back();
      free_.pop_back();
    } else if (slots_.size() < limit_) {
      index = static_cast<std::uint32_t>(slots_.size());
      slots_.emplace_back();
    } else {
      return VIBIF_HANDLE_NONE;
    }
    Slot& slot = slots_[index];
    // Generations skip 0, so no handle ever equals VIBIF_HANDLE_NONE.
    slot.generation = static_cast<std::uint16_t>(slot.generation + 1);
    if (slot.generation == 0) slot.generation = 1;
    slot.object = std::move(object);
    ++size_;
    return vibif_make_handle(index, slot.generation);
  }

  T* find(vibif_handle_t handle) {
    Slot* slot = lookup(handle);
    return slot ? slot->object.get() : nullptr;
  }

  // The owning pointer itself, for operations that may refuse to free.
  std::unique_ptr<T>* owner(vibif_handle_t handle) {
    Slot* slot = lookup(handle);
    return slot ? &slot->object : nullptr;
  }

  // Forgets a slot whose object was freed through owner().
  void release(vibif_handle_t handle) {
    if (Slot* slot = lookup_any(handle); slot && !slot->object) {
      free_.push_back(VIBIF_HANDLE_INDEX(handle));
      --size_;
    }
  }

  // Calls f(handle, object) for every live object.
  template <typename F>
  void for_each(F&& f) {
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i].object) f(vibif_make_handle(static_cast<std::uint32_t>(i), slots_[i].generation), *slots_[i].object);
  }
  template <typename F>
  void for_each(F&& f) const {
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i].object)
        f(vibif_make_handle(static_cast<std::uint32_t>(i), slots_[i].generation),
          static_cast<const T&>(*slots_[i].object));
  }

  std::size_t size() const { return size_; }
  std::size_t clear() {
    const std::size_t n = size_;
    for (auto& s : slots_) s.object.reset();
    slots_.clear();
    free_.clear();
    size_ = 0;
    return n;
  }

 private:
  struct Slot {
    std::unique_ptr<T> object;
    std::uint16_t generation = 0;
  };
  Slot* lookup_any(vibif_handle_t handle) {
    const std::uint32_t index = VIBIF_HANDLE_INDEX(handle);
    if (index >= slots_.size() || slots_[index].generation != VIBIF_HANDLE_GENERATION(handle)) return nullptr;
    return &slots_[index];
  }
  Slot* lookup(vibif_handle_t handle) {
    Slot* slot = lookup_any(handle);
    return slot && slot->object ? slot : nullptr;
  }

  std::size_t limit_;
  std::vector<Slot> slots_;
  std::vector<std::uint32_t> free_;
  std::size_t size_ = 0;
};

}  // namespace vib::backend
