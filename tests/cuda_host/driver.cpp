// Driver of the host emulation: runs the real CUDA launchers of csrc/ (hk::decode_attention_cuda,
// hk::kv_append_cuda) on random inputs, arguments built the way csrc/bindings.cpp builds them,
// and checks every output against a plain C++ reference computed here (double precision
// attention; an element-by-element append with the rotate-half RoPE of common.h).
//
// Input: one case per line on stdin, `decode key=value ...` or `append key=value ...` (see
// parse_decode / parse_append; tests/test_cuda_host.py writes them). Output: one line per case,
// `ok <case> ...` or `FAIL <case>: <what>`, then the launch statistics of the emulator. Exit
// status 1 when a case failed; the emulator itself exits with 86 on a synchronisation error.
//
// Every buffer is a separate heap allocation of exactly its size (ASan catches reads and writes
// past it). Inputs have NaN in every element the kernel must not read (cache slots past
// cache_lens[b], prefix rows past prefix_len, stride padding), so a stray read shows up in the
// output. Outputs are surrounded by 256-byte guard bands and prefilled with a sentinel: after
// the launch the guard bands and every element outside the output view must still hold it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace {

using hk::kBFloat16;
using hk::kFloat16;
using hk::kFloat32;
using hk::kInt32;
using hk::kInt64;

constexpr size_t kGuard = 256;
constexpr uint8_t kSentinel = 0xa5;

float load(int dtype, const void* p) {
  switch (dtype) {
    case kFloat16: return __half2float(*static_cast<const __half*>(p));
    case kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(p));
    default: return *static_cast<const float*>(p);
  }
}

void store(int dtype, void* p, float v) {
  switch (dtype) {
    case kFloat16: *static_cast<__half*>(p) = __float2half_rn(v); break;
    case kBFloat16: *static_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v); break;
    default: *static_cast<float*>(p) = v;
  }
}

// x rounded to `dtype` and back.
float round_to(int dtype, float x) {
  float buf = 0.f;
  store(dtype, &buf, x);
  return load(dtype, &buf);
}

// One heap allocation: [guard | payload | guard], the payload 64-byte aligned (plus `offset`
// bytes, to test misaligned views).
struct Buffer {
  uint8_t* mem = nullptr;
  size_t payload = 0, guard = 0;
  Buffer(size_t bytes, size_t guard_bytes, uint8_t fill) : payload(bytes), guard(guard_bytes) {
    mem = static_cast<uint8_t*>(::operator new[](bytes + 2 * guard, std::align_val_t(64)));
    std::memset(mem, fill, bytes + 2 * guard);
  }
  ~Buffer() { ::operator delete[](mem, std::align_val_t(64)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data() const { return mem + guard; }
  bool guards_intact() const {
    for (size_t i = 0; i < guard; ++i)
      if (mem[i] != kSentinel || mem[guard + payload + i] != kSentinel) return false;
    return true;
  }
};

// A strided view of up to 4 dims (sizes / strides in elements) over its own Buffer.
struct View {
  int dtype, nd;
  int64_t size[4] = {1, 1, 1, 1}, stride[4] = {0, 0, 0, 0}, offset = 0;
  Buffer* buf = nullptr;

  View(int dt, std::vector<int64_t> sizes, std::vector<int64_t> strides, bool output,
       int64_t offset_elems = 0)
      : dtype(dt), nd(int(sizes.size())), offset(offset_elems) {
    int64_t last = offset;
    for (int i = 0; i < nd; ++i) {
      size[i] = sizes[i];
      stride[i] = strides[i];
      last += (sizes[i] - 1) * strides[i];
    }
    const size_t bytes = size_t(last + 1) * es();
    // Inputs: NaN (0xff bytes) everywhere the view does not cover; outputs: the sentinel.
    buf = new Buffer(bytes, output ? kGuard : 0, output ? kSentinel : 0xff);
  }
  ~View() { delete buf; }
  View(const View&) = delete;
  View& operator=(const View&) = delete;

  int64_t es() const { return hk::dtype_size(dtype); }
  int64_t index(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return offset + i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
  }
  void* ptr(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return buf->data() + index(i0, i1, i2, i3) * es();
  }
  void* data() const { return buf->data() + offset * es(); }
  float get(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return load(dtype, ptr(i0, i1, i2, i3));
  }
  void set(float v, int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) {
    store(dtype, ptr(i0, i1, i2, i3), v);
  }
  // True when element `e` of the payload belongs to the view.
  std::vector<bool> covered() const {
    std::vector<bool> in(buf->payload / es(), false);
    for (int64_t a = 0; a < size[0]; ++a)
      for (int64_t b = 0; b < size[1]; ++b)
        for (int64_t c = 0; c < size[2]; ++c)
          for (int64_t d = 0; d < size[3]; ++d) in[index(a, b, c, d)] = true;
    return in;
  }
  // Empty when the guard bands and the elements outside the view still hold the sentinel.
  std::string untouched_outside(const char* name) const {
    if (!buf->guards_intact()) return std::string(name) + ": a guard band was overwritten";
    const std::vector<bool> in = covered();
    for (size_t e = 0; e < in.size(); ++e) {
      if (in[e]) continue;
      for (int64_t k = 0; k < es(); ++k)
        if (buf->data()[e * es() + k] != kSentinel)
          return std::string(name) + ": element " + std::to_string(e) + " outside the view was written";
    }
    return {};
  }
};

struct Case {
  std::string name;
  std::map<std::string, std::string> kv;

  std::string str(const std::string& k, const std::string& def = "") const {
    auto it = kv.find(k);
    if (it == kv.end()) {
      if (def.empty()) throw std::invalid_argument(name + ": missing " + k);
      return def;
    }
    return it->second;
  }
  int64_t num(const std::string& k, int64_t def = INT64_MIN) const {
    auto it = kv.find(k);
    if (it == kv.end()) {
      if (def == INT64_MIN) throw std::invalid_argument(name + ": missing " + k);
      return def;
    }
    return std::stoll(it->second);
  }
  std::vector<int64_t> list(const std::string& k) const {
    std::vector<int64_t> v;
    std::stringstream ss(str(k));
    for (std::string x; std::getline(ss, x, ',');) v.push_back(std::stoll(x));
    return v;
  }
  int dtype() const {
    const std::string d = str("dtype");
    if (d == "f32") return kFloat32;
    if (d == "f16") return kFloat16;
    if (d == "bf16") return kBFloat16;
    throw std::invalid_argument(name + ": dtype must be f32, f16 or bf16");
  }
};

struct Tol {
  double atol, rtol;
};
Tol tolerance(int dtype) {
  switch (dtype) {
    case kFloat16: return {1e-3, 2e-3};
    case kBFloat16: return {8e-3, 8e-3};
    default: return {2e-5, 1e-4};
  }
}

bool close(double got, double want, Tol t) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= t.atol + t.rtol * std::fabs(want);
}

// ---------------------------------------------------------------------------------------------
// decode_attention
std::string run_decode(const Case& c, std::mt19937& rng, std::string& info) {
  const int dtype = c.dtype();
  const int64_t D = c.num("D"), B = c.num("B"), Hq = c.num("Hq"), Hkv = c.num("Hkv");
  const int64_t Lmax = c.num("Lmax"), P = c.num("prefix", 0);
  const int64_t Lp = P > 0 ? P + 3 : 0;  // rows past prefix_len must not be read
  const std::vector<int64_t> lens = c.list("lens");
  // Lengths outside [0, Lmax] (the op rejects them unless value checks are skipped): the kernel
  // clamps, and must never read past the cache.
  auto valid_len = [&](int64_t b) { return std::min(std::max<int64_t>(lens[b], 0), Lmax); };
  const int forced = int(c.num("splits", 0));
  const int device = int(c.num("device", 0));
  const bool strided = c.str("layout", "contig") == "strided";
  const float scale = float(c.num("scale_milli", 0) ? c.num("scale_milli") / 1000.0 : 1.0 / std::sqrt(double(D)));
  if (int64_t(lens.size()) != B) throw std::invalid_argument(c.name + ": lens must have B entries");
  hkemu::device_props(device).sm_count = int(c.num("sms", 132));
  hkemu::device_props(device).blocks_per_sm = int(c.num("per_sm", 4));

  // Layouts: contiguous, or padded rows / interleaved caches / a transposed lse.
  const int64_t pad = strided ? 8 : 0;  // elements; keeps 16-byte alignment for every dtype
  View q(dtype, {B, Hq, D}, {Hq * (D + pad) + pad, D + pad, 1}, false);
  const int64_t kv_rows = strided ? 2 : 1;
  View kc(dtype, {B, Lmax, Hkv, D}, {Lmax * kv_rows * Hkv * D, kv_rows * Hkv * D, D, 1}, false);
  View vc(dtype, {B, Lmax, Hkv, D}, {Lmax * kv_rows * Hkv * D, kv_rows * Hkv * D, D, 1}, false);
  const int64_t lp_rows = std::max<int64_t>(Lp, 1);
  View kp(dtype, {lp_rows, Hkv, D}, {Hkv * (D + pad), D + pad, 1}, false);
  View vp(dtype, {lp_rows, Hkv, D}, {Hkv * (D + pad), D + pad, 1}, false);
  View out(dtype, {B, Hq, D}, {Hq * (D + pad) + pad, D + pad, 1}, true);
  View lse(kFloat32, {B, Hq}, strided ? std::vector<int64_t>{1, B} : std::vector<int64_t>{Hq, 1}, true);
  std::vector<int32_t> cache_lens(lens.begin(), lens.end());
  const auto lens_buf = std::make_unique<Buffer>(B * 4, 0, 0);
  std::memcpy(lens_buf->data(), cache_lens.data(), B * 4);

  std::uniform_real_distribution<float> U(-1.f, 1.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t d = 0; d < D; ++d) q.set(3.f * U(rng), b, h, d);  // peaked softmax
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < valid_len(b); ++j)  // slots past cache_lens[b] stay NaN
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) {
          kc.set(U(rng), b, j, h, d);
          vc.set(U(rng), b, j, h, d);
        }
  for (int64_t j = 0; j < P; ++j)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) {
        kp.set(U(rng), j, h, d);
        vp.set(U(rng), j, h, d);
      }

  // As bindings.cpp: the plan, a workspace of exactly the planned size (torch.empty: here NaN).
  const int S = hk::decode_num_splits_cuda(B, Hq, Hkv, D, Lmax, P, dtype, forced, device);
  const int64_t ws_floats = hk::decode_workspace_floats(B, Hq, D, S);
  View ws(kFloat32, {std::max<int64_t>(ws_floats, 1)}, {1}, true);
  std::memset(ws.data(), 0xff, ws.buf->payload);
  hk::DecodeArgs a{};
  a.B = B;
  a.Hq = Hq;
  a.D = D;
  a.Lmax = Lmax;
  a.Hkv = Hkv;
  a.prefix_len = P;
  a.dtype = dtype;
  a.scale = scale;
  a.q = {q.data(), {q.stride[0], q.stride[1], q.stride[2]}};
  a.out = {out.data(), {out.stride[0], out.stride[1], out.stride[2]}};
  a.k_cache = {kc.data(), {kc.stride[0], kc.stride[1], kc.stride[2], kc.stride[3]}};
  a.v_cache = {vc.data(), {vc.stride[0], vc.stride[1], vc.stride[2], vc.stride[3]}};
  a.lse = static_cast<float*>(lse.data());
  a.lse_stride[0] = lse.stride[0];
  a.lse_stride[1] = lse.stride[1];
  a.cache_lens = reinterpret_cast<const int32_t*>(lens_buf->data());
  if (P > 0) {
    a.k_prefix = {kp.data(), {kp.stride[0], kp.stride[1], kp.stride[2]}};
    a.v_prefix = {vp.data(), {vp.stride[0], vp.stride[1], vp.stride[2]}};
  }
  a.num_splits = S;
  a.workspace = ws_floats > 0 ? static_cast<float*>(ws.data()) : nullptr;
  hk::decode_attention_cuda(a, device, 0);
  if (cudaGetLastError() != cudaSuccess) return "a CUDA error is pending after the launch";
  info = "splits=" + std::to_string(S);

  // Reference: softmax over the prefix keys then the row's own, in double.
  const Tol tol = tolerance(dtype);
  const int64_t group = Hq / Hkv;
  double worst = 0.;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kvh = h / group, n = P + valid_len(b);
      std::vector<double> s(n);
      double m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        double dot = 0.;
        for (int64_t d = 0; d < D; ++d)
          dot += double(q.get(b, h, d)) * (j < P ? kp.get(j, kvh, d) : kc.get(b, j - P, kvh, d));
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double sum = 0.;
      for (int64_t j = 0; j < n; ++j) sum += std::exp(s[j] - m);
      const double ref_lse = n ? m + std::log(sum) : -INFINITY;
      const double got_lse = *static_cast<float*>(lse.ptr(b, h));
      if (!close(got_lse, ref_lse, {2e-4, 1e-5}))
        return "lse[" + std::to_string(b) + ", " + std::to_string(h) + "] = " +
               std::to_string(got_lse) + ", expected " + std::to_string(ref_lse);
      for (int64_t d = 0; d < D; ++d) {
        double o = 0.;
        for (int64_t j = 0; j < n; ++j)
          o += std::exp(s[j] - m) / sum * (j < P ? vp.get(j, kvh, d) : vc.get(b, j - P, kvh, d));
        const double got = out.get(b, h, d);
        worst = std::max(worst, std::fabs(got - o));
        if (!close(got, o, tol))
          return "out[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(d) +
                 "] = " + std::to_string(got) + ", expected " + std::to_string(o);
      }
    }
  for (const auto* v : {&out, &lse}) {
    const std::string err = v->untouched_outside(v == &out ? "out" : "lse");
    if (!err.empty()) return err;
  }
  if (!ws.buf->guards_intact()) return "workspace: a guard band was overwritten";
  char buf[64];
  std::snprintf(buf, sizeof buf, " max_abs_err=%.3g", worst);
  info += buf;
  return {};
}

// ---------------------------------------------------------------------------------------------
// kv_append
std::string run_append(const Case& c, std::mt19937& rng, std::string& info) {
  const int dtype = c.dtype();
  const int64_t B = c.num("B"), T = c.num("T"), Lmax = c.num("Lmax"), H = c.num("H"), D = c.num("D");
  const std::vector<int64_t> pos = c.list("pos");
  const int pos_dtype = c.str("pos_dtype", "i64") == "i32" ? kInt32 : kInt64;
  const std::string layout = c.str("layout", "contig");  // contig | padded | offset | elemstride
  const std::string rope = c.str("rope", "none");         // none | slots | start | tokens
  const int64_t rope_cols = c.num("rope_cols", D / 2);
  const int64_t rope_extra = c.num("rope_extra", 0);  // extra elements per rope table row
  const int device = int(c.num("device", 0));
  if (int64_t(pos.size()) != B) throw std::invalid_argument(c.name + ": pos must have B entries");

  const int64_t pad = layout == "padded" ? 3 : 0;
  const int64_t off = layout == "offset" ? 1 : 0;  // base pointer one element off alignment
  const int64_t es3 = layout == "elemstride" ? 2 : 1;
  auto cache_strides = [&](int64_t L) {
    const int64_t row = D * es3 + pad;
    return std::vector<int64_t>{L * H * row + pad, H * row, row, es3};
  };
  View kc(dtype, {B, Lmax, H, D}, cache_strides(Lmax), true, off);
  View vc(dtype, {B, Lmax, H, D}, cache_strides(Lmax), true, off);
  View kn(dtype, {B, T, H, D}, cache_strides(T), false, off);
  View vn(dtype, {B, T, H, D}, cache_strides(T), false, off);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  for (View* v : {&kc, &vc, &kn, &vn})
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < v->size[1]; ++l)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) v->set(U(rng), b, l, h, d);
  // Expected caches: a copy of the initial ones with the new rows written below.
  std::vector<float> want_k(B * Lmax * H * D), want_v(want_k.size());
  auto at = [&](int64_t b, int64_t l, int64_t h, int64_t d) { return ((b * Lmax + l) * H + h) * D + d; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < Lmax; ++l)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          want_k[at(b, l, h, d)] = kc.get(b, l, h, d);
          want_v[at(b, l, h, d)] = vc.get(b, l, h, d);
        }

  const int pes = pos_dtype == kInt32 ? 4 : 8;
  Buffer pos_buf(B * pes, 0, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (pos_dtype == kInt32) reinterpret_cast<int32_t*>(pos_buf.data())[b] = int32_t(pos[b]);
    else reinterpret_cast<int64_t*>(pos_buf.data())[b] = pos[b];
  }

  hk::KvAppendArgs a{};
  a.B = B;
  a.T = T;
  a.Lmax = Lmax;
  a.H = H;
  a.D = D;
  a.dtype = dtype;
  a.elem_size = hk::dtype_size(dtype);
  a.positions = pos_buf.data();
  a.positions_dtype = pos_dtype;
  for (auto [dst, v] : {std::pair{&a.k_cache, &kc}, {&a.v_cache, &vc}, {&a.k_new, &kn}, {&a.v_new, &vn}})
    *dst = {v->data(), {v->stride[0], v->stride[1], v->stride[2], v->stride[3]}};

  // RoPE: float32 tables [rows, rope_cols] (row stride rope_cols + rope_extra); the rotary
  // position of token t of row b is rope_pos(b, t).
  std::vector<int64_t> rpos;  // [B, T] rotary positions ("tokens"), or [B] starts ("start")
  std::unique_ptr<View> cos_t, sin_t;
  std::unique_ptr<Buffer> rpos_buf;
  auto rope_pos = [&](int64_t b, int64_t t) -> int64_t {
    if (rope == "tokens") return rpos[b * T + t];
    if (rope == "start") return rpos[b] + t;
    return pos[b] + t;
  };
  if (rope != "none") {
    int64_t rows = c.num("rope_rows", Lmax);
    const int64_t rstride = rope_cols + rope_extra;
    cos_t = std::make_unique<View>(kFloat32, std::vector<int64_t>{rows, rope_cols},
                                   std::vector<int64_t>{rstride, 1}, false);
    sin_t = std::make_unique<View>(kFloat32, std::vector<int64_t>{rows, rope_cols},
                                   std::vector<int64_t>{rstride, 1}, false);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < rope_cols; ++i) {
        const double ang = double(r) / std::pow(10000.0, double(2 * (i % (D / 2))) / double(D));
        cos_t->set(float(std::cos(ang)), r, i);
        sin_t->set(float(std::sin(ang)), r, i);
      }
    std::uniform_int_distribution<int64_t> R(0, rows - 1);
    if (c.kv.count("rpos")) {  // explicit positions (out-of-table ones too)
      rpos = c.list("rpos");
    } else if (rope == "tokens") {
      for (int64_t i = 0; i < B * T; ++i) rpos.push_back(R(rng));
    } else if (rope == "start") {
      std::uniform_int_distribution<int64_t> S(0, rows - T);
      for (int64_t b = 0; b < B; ++b) rpos.push_back(S(rng));
    }
    a.rope_cos = static_cast<const float*>(cos_t->data());
    a.rope_sin = static_cast<const float*>(sin_t->data());
    a.rope_rows = rows;
    a.rope_row_stride = rstride;
    if (rope == "slots") {  // bindings.cpp: no rope_positions -> the cache slot
      a.rope_positions = a.positions;
      a.rope_positions_dtype = pos_dtype;
      a.rope_pos_stride[0] = 1;
    } else {
      rpos_buf = std::make_unique<Buffer>(rpos.size() * 8, 0, 0);
      std::memcpy(rpos_buf->data(), rpos.data(), rpos.size() * 8);
      a.rope_positions = rpos_buf->data();
      a.rope_positions_dtype = kInt64;
      a.rope_pos_stride[0] = rope == "tokens" ? T : 1;
      a.rope_pos_stride[1] = rope == "tokens" ? 1 : 0;
      a.rope_pos_step = rope == "tokens" ? 0 : 1;
    }
  }
  hk::kv_append_cuda(a, device, 0);

  // Token t of row b is written only when its slots fit the cache and its rotary position the
  // table (the host checks reject anything else unless value checks are skipped; the kernels
  // then skip the token rather than write out of bounds).
  auto written = [&](int64_t b, int64_t t) {
    const bool fits = pos[b] >= 0 && pos[b] <= Lmax - T;
    if (!fits || rope == "none") return fits;
    const int64_t p = rope == "tokens" ? rpos[b * T + t] : rope == "start" ? rpos[b] : pos[b];
    const int64_t offset = rope == "tokens" ? 0 : t;
    return p >= 0 && p < cos_t->size[0] - offset;
  };
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H && written(b, t); ++h)
        for (int64_t d = 0; d < D; ++d) {
          float k = kn.get(b, t, h, d);
          if (rope != "none") {
            const int64_t p = rope_pos(b, t), i = d % half;
            const float cs = cos_t->get(p, i), sn = sin_t->get(p, i);
            const float x1 = kn.get(b, t, h, i), x2 = kn.get(b, t, h, i + half);
            const float r = d < half ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
            k = round_to(dtype, r);
          }
          want_k[at(b, pos[b] + t, h, d)] = k;
          want_v[at(b, pos[b] + t, h, d)] = vn.get(b, t, h, d);
        }
  // Rotated keys may differ from the reference by one rounding; everything else is a bit copy.
  const Tol tol = rope != "none" ? tolerance(dtype) : Tol{0., 0.};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < Lmax; ++l)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          const float gk = kc.get(b, l, h, d), gv = vc.get(b, l, h, d);
          const std::string where = "[" + std::to_string(b) + ", " + std::to_string(l) + ", " +
                                    std::to_string(h) + ", " + std::to_string(d) + "]";
          if (!close(gk, want_k[at(b, l, h, d)], tol))
            return "k_cache" + where + " = " + std::to_string(gk) + ", expected " +
                   std::to_string(want_k[at(b, l, h, d)]);
          if (gv != want_v[at(b, l, h, d)])
            return "v_cache" + where + " = " + std::to_string(gv) + ", expected " +
                   std::to_string(want_v[at(b, l, h, d)]);
        }
  for (const auto* v : {&kc, &vc}) {
    const std::string err = v->untouched_outside(v == &kc ? "k_cache" : "v_cache");
    if (!err.empty()) return err;
  }
  info = "ok";
  return {};
}

}  // namespace

int main() {
  int failed = 0, ran = 0;
  for (std::string line; std::getline(std::cin, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    Case c;
    std::string op;
    ss >> op;
    for (std::string tok; ss >> tok;) {
      const size_t eq = tok.find('=');
      if (eq == std::string::npos) throw std::invalid_argument("bad token " + tok);
      c.kv[tok.substr(0, eq)] = tok.substr(eq + 1);
    }
    c.name = c.str("id", line);
    std::mt19937 rng(uint32_t(c.num("seed", 0)));
    std::string info, err;
    try {
      err = op == "decode" ? run_decode(c, rng, info)
            : op == "append" ? run_append(c, rng, info)
                             : "unknown op " + op;
    } catch (const std::exception& e) {
      err = std::string("exception: ") + e.what();
    }
    ++ran;
    if (err.empty()) {
      std::printf("ok %s %s\n", c.name.c_str(), info.c_str());
    } else {
      ++failed;
      std::printf("FAIL %s: %s\n", c.name.c_str(), err.c_str());
    }
    std::fflush(stdout);
  }
  hkemu::print_launch_stats(stdout);
  std::printf("cases %d failed %d\n", ran, failed);
  return failed ? 1 : 0;
}
