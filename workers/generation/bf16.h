// bfloat16 <-> float32 for the engine's C++ kernels (lowrank_rows.cpp, decode_kernels.cpp).
#pragma once

#include <cstdint>
#include <cstring>

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}
