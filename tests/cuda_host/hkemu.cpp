// hkemu runtime: fibers, the block scheduler with its barrier / warp-collective checks, the
// per-block shared-memory arena, launches and the emulated devices (see hkemu.h, README.md).
#include "hkemu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define HKEMU_ASAN 1
#else
#define HKEMU_ASAN 0
#endif

namespace hkemu {
namespace {

constexpr int kErrorExit = 86;
constexpr size_t kSharedArena = 1 << 20;  // bytes; payload limit is DeviceProps::max_static_shared
constexpr size_t kSharedRedzone = 64;     // poisoned bytes before every __shared__ variable

enum class Wait { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // usable stack, above a PROT_NONE guard page
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // ASan's fake stack while switched out
  ThreadState ts{};
  int linear = 0;
  Wait wait = Wait::kRunnable;
  Site site{};
  Coll kind = Coll::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
};

struct Stats {
  long launches = 0, blocks = 0, threads = 0, failed = 0;
};

struct Emu {
  DeviceProps props[kMaxDevices];
  int device = 0;
  int error = 0;
  std::vector<Fiber*> fibers;  // reused by every block; stacks allocated once, freed at exit
  size_t stack_bytes = 0;
  ucontext_t sched_ctx;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  Fiber* current = nullptr;
  const LaunchInfo* launch = nullptr;
  ThreadBody body = nullptr;
  void* body_ctx = nullptr;
  uint3 block_idx{};
  int nthreads = 0;
  uint64_t block_serial = 0;
  char* arena = nullptr;
  size_t arena_used = 0, shared_payload = 0;
  uint64_t seed = 1;
  std::mt19937_64 rng;
  std::map<std::string, Stats> stats;
  std::unordered_map<const char*, std::string> names;

  Emu() {
    if (const char* s = std::getenv("HKEMU_SEED")) seed = std::strtoull(s, nullptr, 10);
    rng.seed(seed);
    size_t kb = 64;
    if (const char* s = std::getenv("HKEMU_STACK_KB")) kb = std::max<size_t>(16, std::strtoull(s, nullptr, 10));
    stack_bytes = kb * 1024;
    arena = static_cast<char*>(std::aligned_alloc(4096, kSharedArena));
  }
  ~Emu() {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (Fiber* f : fibers) {
      if (f->stack != nullptr) munmap(f->stack - page, f->stack_size + page);
      delete f;
    }
#if HKEMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(arena, kSharedArena);
#endif
    std::free(arena);
  }
};

Emu& emu() {
  static Emu e;
  return e;
}

const char* kind_name(Coll k) {
  switch (k) {
    case Coll::kShflIdx: return "__shfl_sync";
    case Coll::kShflXor: return "__shfl_xor_sync";
    case Coll::kShflDown: return "__shfl_down_sync";
    case Coll::kShflUp: return "__shfl_up_sync";
    case Coll::kBallot: return "__ballot_sync";
    case Coll::kAny: return "__any_sync";
    case Coll::kAll: return "__all_sync";
    case Coll::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string describe(const Fiber& f) {
  char buf[256];
  const uint3 t = f.ts.thread_idx;
  int n = std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) [lane %d of warp %d]", t.x, t.y, t.z,
                        f.linear % 32, f.linear / 32);
  switch (f.wait) {
    case Wait::kDone: std::snprintf(buf + n, sizeof buf - n, " has exited"); break;
    case Wait::kBarrier:
      std::snprintf(buf + n, sizeof buf - n, " waits at __syncthreads (%s:%d)", f.site.file, f.site.line);
      break;
    case Wait::kWarp:
      std::snprintf(buf + n, sizeof buf - n, " waits at %s(mask 0x%08x) (%s:%d)", kind_name(f.kind),
                    f.mask, f.site.file, f.site.line);
      break;
    case Wait::kRunnable: std::snprintf(buf + n, sizeof buf - n, " is running"); break;
  }
  return buf;
}

Fiber& running(const char* what) {
  Emu& e = emu();
  if (e.current == nullptr) fatal("%s called outside a kernel", what);
  return *e.current;
}

void switch_to_scheduler(Fiber& f, bool exiting) {
  Emu& e = emu();
#if HKEMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, e.sched_bottom, e.sched_size);
#else
  (void)exiting;
#endif
  swapcontext(&f.ctx, &e.sched_ctx);
#if HKEMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &e.sched_bottom, &e.sched_size);
#endif
}

void fiber_entry() {
  Emu& e = emu();
#if HKEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &e.sched_bottom, &e.sched_size);
#endif
  Fiber& f = *e.current;
  e.body(e.body_ctx);
  f.wait = Wait::kDone;
  switch_to_scheduler(f, /*exiting=*/true);
  std::abort();  // a finished fiber is never resumed
}

void resume(Fiber& f) {
  Emu& e = emu();
  e.current = &f;
#if HKEMU_ASAN
  __sanitizer_start_switch_fiber(&e.sched_fake, f.stack, f.stack_size);
#endif
  swapcontext(&e.sched_ctx, &f.ctx);
#if HKEMU_ASAN
  __sanitizer_finish_switch_fiber(e.sched_fake, nullptr, nullptr);
#endif
  e.current = nullptr;
}

void prepare_fiber(Fiber& f) {
  Emu& e = emu();
  if (f.stack == nullptr) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, e.stack_bytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) fatal("cannot allocate a fiber stack");
    mprotect(mem, page, PROT_NONE);  // stack overflow -> SIGSEGV, not silent corruption
    f.stack = static_cast<char*>(mem) + page;
    f.stack_size = e.stack_bytes;
  }
#if HKEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);  // frames of the previous block's thread
#endif
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = f.stack_size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
  // makecontext has placed the stack pointer; clearing uc_stack keeps ASan's swapcontext
  // interceptor from wiping this stack's shadow (its frames' redzones) at every switch.
  f.ctx.uc_stack.ss_sp = nullptr;
  f.ctx.uc_stack.ss_size = 0;
  f.fake_stack = nullptr;
  f.wait = Wait::kRunnable;
}

// Result of lane `f`'s collective, all lanes of `mask` having arrived (warp starts at `w0`).
uint64_t collective_result(const Fiber& f, const std::vector<Fiber*>& fibers, int w0) {
  const int lane = f.linear - w0;
  const int width = f.width;
  const int min_lane = lane & ~(width - 1), max_lane = min_lane | (width - 1);
  int src = lane;
  switch (f.kind) {
    case Coll::kShflIdx: src = min_lane + (f.arg & (width - 1)); break;
    case Coll::kShflXor: src = (lane ^ f.arg) <= max_lane ? lane ^ f.arg : lane; break;
    case Coll::kShflDown: src = lane + f.arg <= max_lane ? lane + f.arg : lane; break;
    case Coll::kShflUp: src = lane - f.arg >= min_lane ? lane - f.arg : lane; break;
    case Coll::kBallot:
    case Coll::kAny:
    case Coll::kAll: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if ((f.mask >> l & 1u) && fibers[w0 + l]->value) ballot |= 1u << l;
      if (f.kind == Coll::kBallot) return ballot;
      if (f.kind == Coll::kAny) return ballot != 0;
      return ballot == f.mask;
    }
    case Coll::kSyncWarp: return 0;
  }
  if (src < 0 || src >= 32 || !(f.mask >> src & 1u))
    fatal("%s: lane %d reads lane %d, which is not in the mask 0x%08x (%s:%d)", kind_name(f.kind),
          lane, src, f.mask, f.site.file, f.site.line);
  return fibers[w0 + src]->value;
}

// Releases every warp collective whose lanes have all arrived (appending them to `runnable`);
// reports a collective that can never complete.
void resolve_warps(std::vector<Fiber*>& fibers, int n, std::vector<int>& runnable) {
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = *fibers[w0 + l];
      if (f.wait != Wait::kWarp) continue;
      for (int o = 0; o < 32; ++o) {
        if (!(f.mask >> o & 1u)) continue;
        if (o >= lanes)
          fatal("%s names lane %d of warp %d, which does not exist (the block has %d threads): %s",
                kind_name(f.kind), o, w0 / 32, n, describe(f).c_str());
        const Fiber& g = *fibers[w0 + o];
        if (g.wait != Wait::kWarp || g.kind != f.kind || g.mask != f.mask || g.width != f.width ||
            (f.kind != Coll::kSyncWarp &&
             (g.site.line != f.site.line || std::strcmp(g.site.file, f.site.file) != 0)))
          fatal("warp collective with a missing or mismatched lane: %s, but %s", describe(f).c_str(),
                describe(g).c_str());
      }
      std::vector<uint64_t> results;
      for (int o = 0; o < 32; ++o)
        if (f.mask >> o & 1u) results.push_back(collective_result(*fibers[w0 + o], fibers, w0));
      size_t k = 0;
      for (int o = 0; o < 32; ++o)
        if (f.mask >> o & 1u) {
          fibers[w0 + o]->result = results[k++];
          fibers[w0 + o]->wait = Wait::kRunnable;
          runnable.push_back(w0 + o);
        }
    }
  }
}

void run_block(int n) {
  Emu& e = emu();
  ++e.block_serial;
#if HKEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(e.arena, kSharedArena);
#endif
  std::memset(e.arena, 0xff, kSharedArena);  // uninitialised shared memory: NaN / -1
#if HKEMU_ASAN
  ASAN_POISON_MEMORY_REGION(e.arena, kSharedArena);
#endif
  e.arena_used = 0;
  e.shared_payload = 0;

  const dim3 bd = e.launch->block;
  std::vector<int> runnable;
  for (int i = 0; i < n; ++i) {
    Fiber& f = *e.fibers[i];
    prepare_fiber(f);
    f.linear = i;
    f.ts.thread_idx = {unsigned(i) % bd.x, unsigned(i) / bd.x % bd.y, unsigned(i) / (bd.x * bd.y)};
    f.ts.block_idx = e.block_idx;
    f.ts.block_dim = bd;
    f.ts.grid_dim = e.launch->grid;
    runnable.push_back(i);
  }
  for (;;) {
    if (e.seed != 0) std::shuffle(runnable.begin(), runnable.end(), e.rng);
    for (int i : runnable) resume(*e.fibers[i]);
    runnable.clear();
    resolve_warps(e.fibers, n, runnable);
    if (!runnable.empty()) continue;
    int done = 0;
    const Fiber* first = nullptr;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = *e.fibers[i];
      if (f.wait == Wait::kDone) ++done;
      else if (first == nullptr) first = &f;
    }
    if (done == n) break;
    // Every other thread waits at a __syncthreads (warp collectives were resolved or reported).
    for (int i = 0; i < n; ++i) {
      const Fiber& f = *e.fibers[i];
      if (f.wait == Wait::kDone)
        fatal("__syncthreads reached by %d of the block's %d threads (a barrier in divergent code): "
              "%s, but %s", n - done, n, describe(*first).c_str(), describe(f).c_str());
      if (f.site.line != first->site.line || std::strcmp(f.site.file, first->site.file) != 0)
        fatal("threads wait at different __syncthreads (divergent barriers): %s, but %s",
              describe(*first).c_str(), describe(f).c_str());
    }
    for (int i = 0; i < n; ++i) {
      e.fibers[i]->wait = Wait::kRunnable;
      runnable.push_back(i);
    }
  }
}

}  // namespace

void fatal(const char* fmt, ...) {
  Emu& e = emu();
  std::fflush(stdout);
  std::fprintf(stderr, "hkemu: error");
  if (e.launch != nullptr) {
    std::fprintf(stderr, " in kernel %s (launched at %s:%d), block (%u,%u,%u)", e.launch->kernel,
                 e.launch->site.file, e.launch->site.line, e.block_idx.x, e.block_idx.y,
                 e.block_idx.z);
    if (e.current != nullptr) {
      const uint3 t = e.current->ts.thread_idx;
      std::fprintf(stderr, ", thread (%u,%u,%u)", t.x, t.y, t.z);
    }
  }
  std::fprintf(stderr, ": ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(kErrorExit);
}

ThreadState& this_thread() { return running("threadIdx / blockIdx / blockDim / gridDim").ts; }

void syncthreads(Site site) {
  Fiber& f = running("__syncthreads");
  f.wait = Wait::kBarrier;
  f.site = site;
  switch_to_scheduler(f, false);
}

uint64_t warp_collective(Coll kind, unsigned mask, uint64_t value, int arg, int width, Site site) {
  Fiber& f = running(kind_name(kind));
  if (width < 1 || width > 32 || (width & (width - 1)))
    fatal("%s: width %d is not a power of two in 1..32 (%s:%d)", kind_name(kind), width, site.file,
          site.line);
  if (!(mask >> (f.linear % 32) & 1u))
    fatal("%s: mask 0x%08x does not name the calling lane %d (%s:%d)", kind_name(kind), mask,
          f.linear % 32, site.file, site.line);
  f.wait = Wait::kWarp;
  f.kind = kind;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.site = site;
  switch_to_scheduler(f, false);
  return f.result;
}

void* shared_get(SharedSlot& slot, size_t bytes, size_t align, const char* name, Site site) {
  Emu& e = emu();
  running("a __shared__ declaration");
  if (slot.block_serial == e.block_serial) return slot.ptr;
  size_t off = (e.arena_used + kSharedRedzone + align - 1) / align * align;
  e.shared_payload += bytes;
  const size_t limit = e.props[e.device].max_static_shared;
  if (e.shared_payload > limit || off + bytes + kSharedRedzone > kSharedArena)
    fatal("__shared__ %s (%s:%d) brings the block's static shared memory to %zu bytes, over the "
          "%zu-byte limit", name, site.file, site.line, e.shared_payload, limit);
  void* p = e.arena + off;
#if HKEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(p, bytes);
#endif
  e.arena_used = off + bytes;
  slot.block_serial = e.block_serial;
  slot.ptr = p;
  return p;
}

DeviceProps& device_props(int device) {
  if (device < 0 || device >= kMaxDevices) fatal("device %d does not exist", device);
  return emu().props[device];
}
int current_device() { return emu().device; }
void set_current_device(int device) { emu().device = device; }
int& last_error() { return emu().error; }

const char* intern_kernel_name(const char* pretty) {
  Emu& e = emu();
  auto it = e.names.find(pretty);
  if (it == e.names.end()) {
    std::string s = pretty;
    const size_t at = s.find("F = ");
    if (at != std::string::npos) {
      s = s.substr(at + 4);
      int depth = 0;
      size_t end = 0;
      for (; end < s.size(); ++end) {
        const char c = s[end];
        if (c == '<' || c == '(') ++depth;
        if (c == '>' || c == ')') --depth;
        if (depth == 0 && (c == ';' || c == ']')) break;
        if (depth < 0) break;
      }
      s = s.substr(0, end);
    }
    it = e.names.emplace(pretty, s).first;
  }
  return it->second.c_str();
}

void run_launch(const LaunchInfo& info, ThreadBody body, void* ctx) {
  Emu& e = emu();
  if (e.launch != nullptr) fatal("kernel %s launched from inside a kernel", info.kernel);
  Stats& st = e.stats[info.kernel];
  const DeviceProps& p = e.props[e.device];
  const uint64_t threads = uint64_t(info.block.x) * info.block.y * info.block.z;
  const bool bad = threads == 0 || threads > uint64_t(p.max_threads_per_block) ||
                   info.block.x > 1024 || info.block.y > 1024 || info.block.z > 64 ||
                   info.grid.x == 0 || info.grid.y == 0 || info.grid.z == 0 ||
                   info.grid.x > 0x7fffffffu || info.grid.y > 65535 || info.grid.z > 65535 ||
                   info.dynamic_smem > p.max_static_shared;
  if (bad) {
    ++st.failed;
    e.error = 9;  // cudaErrorInvalidConfiguration
    return;
  }
  const int n = int(threads);
  while (int(e.fibers.size()) < n) e.fibers.push_back(new Fiber);
  const uint64_t blocks = uint64_t(info.grid.x) * info.grid.y * info.grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  if (e.seed != 0) std::shuffle(order.begin(), order.end(), e.rng);  // blocks are independent
  e.launch = &info;
  e.body = body;
  e.body_ctx = ctx;
  for (const uint64_t i : order) {
    e.block_idx = {unsigned(i % info.grid.x), unsigned(i / info.grid.x % info.grid.y),
                   unsigned(i / (uint64_t(info.grid.x) * info.grid.y))};
    run_block(n);
  }
  e.launch = nullptr;
  ++st.launches;
  st.blocks += long(blocks);
  st.threads += long(blocks * threads);
}

void print_launch_stats(std::FILE* out) {
  for (const auto& [name, s] : emu().stats)
    std::fprintf(out, "launches %ld blocks %ld threads %ld invalid %ld kernel %s\n", s.launches,
                 s.blocks, s.threads, s.failed, name.c_str());
}

void reset_launch_stats() { emu().stats.clear(); }

}  // namespace hkemu
