// oneDNN 2-D convolutions for XLA:CPU through the XLA FFI (jax.ffi).
//
// Three handlers, float32, NHWC activations and HWIO kernels (row-major, as
// jax lays them out), strides and (possibly asymmetric) non-negative padding:
//
//   jaxsam_onednn_conv_fwd          (x[N,H,W,C],  w[KH,KW,C,O])  -> y[N,HO,WO,O]
//   jaxsam_onednn_conv_bwd_data     (dy[N,HO,WO,O], w[KH,KW,C,O]) -> dx[N,H,W,C]
//   jaxsam_onednn_conv_bwd_weights  (x[N,H,W,C], dy[N,HO,WO,O])  -> dw[KH,KW,C,O]
//
// Attributes sh, sw (strides) and pt, pb, pl, pr (top, bottom, left, right
// padding), all int64. The shapes that the result implies (H, W for the data
// gradient, KH, KW for the weight gradient) come from the result buffer.
//
// Each distinct (op, shapes, strides, padding) builds its primitive
// descriptor once and keeps it in a process-wide cache. Activations stay in
// NHWC (no reorders of the large tensors); kernels use the format oneDNN
// prefers ("any") and are reordered from/to HWIO on each call (small). The
// scratchpad is the calling thread's own (user mode, kept and grown per
// thread), so one cached primitive may run on several XLA threads at once.
//
// Threading: by default a call runs on XLA's own intra-op thread pool (the FFI's
// ThreadPool context), not on oneDNN's OpenMP team, so the convolutions never
// run beside XLA's threads on the same cores. The batch is cut into one part
// per pool thread; each part is a single-threaded oneDNN primitive for its
// sub-batch (the weight gradient sums the parts' partial gradients). Parts are
// claimed from a counter by the calling thread and the pool tasks alike, and
// the caller waits only for parts already running, so a call cannot deadlock
// when every pool thread is busy (it then runs all parts itself).
// JAXSAM_ONEDNN_THREADING=omp restores oneDNN's OpenMP threading (one
// primitive over the whole batch; OMP_NUM_THREADS bounds it).

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);  // libgomp, which libdnnl (onednn-cpu-gomp) links

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Op : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// op, n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr, single_threaded
// (oneDNN fixes a primitive's thread partition when it is created).
using Key = std::array<int64_t, 17>;

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

struct Entry {
  dnnl::primitive prim;
  memory::desc act_a;     // first activation (src or diff_src), NHWC
  memory::desc act_b;     // second activation (dst or diff_dst), NHWC
  memory::desc wei_user;  // HWIO as jax holds it
  memory::desc wei_prim;  // what the primitive wants
  bool wei_reorder = false;
  dnnl::reorder reorder;  // wei_user -> wei_prim (fwd, bwd_data) or back (bwd_weights)
  memory::desc scratch;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex cache_mutex;
std::unordered_map<Key, std::shared_ptr<Entry>, KeyHash> cache;

std::shared_ptr<Entry> Build(const Key& k) {
  const auto [op, n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr, single] = k;
  dnnl::engine& eng = Engine();
  memory::desc src({n, c, h, w}, dt::f32, tag::nhwc);
  memory::desc dst({n, o, ho, wo}, dt::f32, tag::nhwc);
  memory::desc wei_user({o, c, kh, kw}, dt::f32, tag::hwio);
  memory::desc wei_any({o, c, kh, kw}, dt::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, algo, src, wei_any,
                                                dst, strides, pad_l, pad_r, attr);
  auto e = std::make_shared<Entry>();
  e->act_a = src;
  e->act_b = dst;
  e->wei_user = wei_user;
  if (op == kFwd) {
    e->prim = dnnl::convolution_forward(fwd);
    e->wei_prim = fwd.weights_desc();
    e->scratch = fwd.scratchpad_desc();
  } else if (op == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(eng, algo, src, wei_any, dst, strides, pad_l, pad_r, fwd,
                                                        attr);
    e->prim = dnnl::convolution_backward_data(bwd);
    e->wei_prim = bwd.weights_desc();
    e->scratch = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(eng, algo, src, wei_any, dst, strides, pad_l, pad_r,
                                                           fwd, attr);
    e->prim = dnnl::convolution_backward_weights(bwd);
    e->wei_prim = bwd.diff_weights_desc();
    e->scratch = bwd.scratchpad_desc();
  }
  e->wei_reorder = e->wei_prim != e->wei_user;
  if (e->wei_reorder) {
    e->reorder = op == kBwdWeights ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->wei_prim, eng, wei_user))
                                   : dnnl::reorder(dnnl::reorder::primitive_desc(eng, wei_user, eng, e->wei_prim));
  }
  return e;
}

std::shared_ptr<Entry> Lookup(const Key& k) {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  auto e = Build(k);  // outside the lock: building can take milliseconds
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(k, e).first->second;
}

std::atomic<int64_t> busy_ns{0};  // wall time inside the handlers, summed over calls (for the benchmark)

bool UseOpenMP() {
  static const bool omp = [] {
    const char* v = std::getenv("JAXSAM_ONEDNN_THREADING");
    return v != nullptr && std::strcmp(v, "omp") == 0;
  }();
  return omp;
}

// Runs work(0, slot), ..., work(parts - 1, slot) on the calling thread and up to `helpers` pool tasks;
// returns when all are done. `slot` (0 .. helpers) names the participant running a part, so that a
// part may add into that participant's own buffer.
void ParallelFor(ffi::ThreadPool& pool, int parts, int helpers, const std::function<void(int, int)>& work) {
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> slots{0};
    int done = 0;
    std::mutex m;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const std::function<void(int, int)>* job = &work;
  // The helpers share `state`; a helper that starts after the last part was claimed returns at once
  // and never touches `work`, which lives on the caller's stack.
  auto drain = [state, job, parts] {
    int slot = -1;
    for (int i; (i = state->next.fetch_add(1)) < parts;) {
      if (slot < 0) slot = state->slots.fetch_add(1);
      (*job)(i, slot);
      std::lock_guard<std::mutex> lock(state->m);
      if (++state->done == parts) state->cv.notify_all();
    }
  };
  for (int i = 0; i < helpers; ++i) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  std::unique_lock<std::mutex> lock(state->m);
  state->cv.wait(lock, [&] { return state->done == parts; });
}

// This thread's scratchpad, grown as needed and kept: a fresh allocation per call would fault in its
// pages every time. One thread runs one primitive at a time, so one buffer per thread suffices.
void* Scratch(size_t bytes) {
  struct Buffer {
    void* p = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buffer;
  if (bytes > buffer.size) {
    std::free(buffer.p);
    buffer.size = (bytes + 63) / 64 * 64;
    buffer.p = std::aligned_alloc(64, buffer.size);
    if (buffer.p == nullptr) {
      buffer.size = 0;
      throw dnnl::error(dnnl_out_of_memory, "scratchpad allocation failed");
    }
  }
  return buffer.p;
}

// sum += add, elementwise over `count` floats (two weight gradients of one layout).
void AddInto(memory& sum, const memory& add, size_t count) {
  float* s = static_cast<float*>(sum.get_data_handle());
  const float* a = static_cast<const float*>(add.get_data_handle());
  for (size_t j = 0; j < count; ++j) s[j] += a[j];
}

// One primitive call on its own operands (the weights already in the primitive's format).
void Execute(Op op, const Entry& e, dnnl::stream& stream, memory& ma, memory& mb, memory& mw) {
  memory scratch(e.scratch, Engine(), Scratch(std::max<size_t>(e.scratch.get_size(), 1)));
  if (op == kFwd) {
    e.prim.execute(stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_DST, mb},
                            {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (op == kBwdData) {
    e.prim.execute(stream, {{DNNL_ARG_DIFF_SRC, ma}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_DIFF_DST, mb},
                            {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    e.prim.execute(stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_DIFF_WEIGHTS, mw}, {DNNL_ARG_DIFF_DST, mb},
                            {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

// a: the NHWC tensor of the input side (x or dx), b: of the output side (y or dy), wt: HWIO kernel.
ffi::Error Run(Op op, float* a, float* b, float* wt, ffi::Span<const int64_t> a_dims,
               ffi::Span<const int64_t> b_dims, ffi::Span<const int64_t> w_dims, int64_t sh, int64_t sw, int64_t pt,
               int64_t pb, int64_t pl, int64_t pr, ffi::ThreadPool pool) {
  if (a_dims.size() != 4 || b_dims.size() != 4 || w_dims.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: expected rank-4 NHWC activations and an HWIO kernel");
  if (w_dims[2] != a_dims[3] || w_dims[3] != b_dims[3] || a_dims[0] != b_dims[0])
    return ffi::Error::InvalidArgument("onednn_conv: channel or batch sizes of the operands disagree");
  if (pt < 0 || pb < 0 || pl < 0 || pr < 0 || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("onednn_conv: negative padding or non-positive stride");
  struct Clock {
    std::chrono::steady_clock::time_point t0;
    ~Clock() {
      busy_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    }
  } clock{std::chrono::steady_clock::now()};
  const int64_t n = a_dims[0];
  const bool omp = UseOpenMP();
  const int64_t threads = omp ? 1 : std::max<int64_t>(1, pool.num_threads());
  const int parts = static_cast<int>(std::min<int64_t>(n, threads));
  // Sub-batch sizes: the first n % parts parts take one image more.
  auto rows = [&](int i) { return n / parts + (i < n % parts ? 1 : 0); };
  auto first = [&](int i) { return i * (n / parts) + std::min<int64_t>(i, n % parts); };
  auto key = [&](int64_t rows_i) {
    return Key{op,        rows_i,    a_dims[1], a_dims[2], a_dims[3], w_dims[0], w_dims[1], w_dims[3], b_dims[1],
               b_dims[2], sh,        sw,        pt,        pb,        pl,        pr,        omp ? 0 : 1};
  };
  const int64_t a_row = a_dims[1] * a_dims[2] * a_dims[3], b_row = b_dims[1] * b_dims[2] * b_dims[3];
  try {
    dnnl::engine& eng = Engine();
    if (!omp) omp_set_num_threads(1);  // this thread's primitives (and their creation) single-threaded
    std::vector<std::shared_ptr<Entry>> entries(parts);
    for (int i = 0; i < parts; ++i) entries[i] = (i > 0 && rows(i) == rows(i - 1)) ? entries[i - 1] : Lookup(key(rows(i)));
    const Entry& e0 = *entries[0];
    memory mw_user(e0.wei_user, eng, wt);
    thread_local dnnl::stream stream(eng);
    // Forward and data gradient: the kernel in each part's layout, reordered once per distinct layout
    // (parts of two batch sizes may, in principle, want different layouts).
    std::vector<memory> weights(parts);
    if (op != kBwdWeights) {
      for (int i = 0; i < parts; ++i) {
        const Entry& e = *entries[i];
        int same = -1;
        for (int j = 0; j < i && same < 0; ++j)
          if (entries[j]->wei_prim == e.wei_prim) same = j;
        if (same >= 0) {
          weights[i] = weights[same];
        } else if (!e.wei_reorder) {
          weights[i] = mw_user;
        } else {
          weights[i] = memory(e.wei_prim, eng);
          e.reorder.execute(stream, mw_user, weights[i]);
          stream.wait();
        }
      }
    }
    // Weight gradient: each participant sums its parts into its own buffer, in part 0's layout.
    const int slots = parts;  // at most one participant per part: the caller and parts - 1 pool tasks
    std::vector<memory> sums(slots), spare(slots);
    std::vector<char> has_sum(slots, 0), has_spare(slots, 0);
    const size_t count = e0.wei_prim.get_size() / sizeof(float);
    std::vector<std::string> errors(parts);
    ParallelFor(pool, parts, slots - 1, [&](int i, int slot) {
      try {
        if (!omp) omp_set_num_threads(1);
        thread_local dnnl::stream part_stream(Engine());
        const Entry& e = *entries[i];
        memory ma(e.act_a, eng, a + first(i) * a_row), mb(e.act_b, eng, b + first(i) * b_row);
        if (op != kBwdWeights) {
          Execute(op, e, part_stream, ma, mb, weights[i]);
          return;
        }
        // This part's gradient into `dst` (part 0's layout), through its own layout if that differs.
        auto into = [&](memory& dst) {
          if (e.wei_prim == e0.wei_prim) {
            Execute(op, e, part_stream, ma, mb, dst);
          } else {
            memory own(e.wei_prim, eng);
            Execute(op, e, part_stream, ma, mb, own);
            dnnl::reorder(own, dst).execute(part_stream, own, dst);
            part_stream.wait();
          }
        };
        if (!has_sum[slot]) {
          sums[slot] = memory(e0.wei_prim, eng);
          into(sums[slot]);
          has_sum[slot] = 1;
          return;
        }
        if (!has_spare[slot]) {
          spare[slot] = memory(e0.wei_prim, eng);
          has_spare[slot] = 1;
        }
        into(spare[slot]);
        AddInto(sums[slot], spare[slot], count);
      } catch (const dnnl::error& err) {
        errors[i] = err.what();
      }
    });
    for (const auto& err : errors)
      if (!err.empty()) return ffi::Error::Internal("onednn_conv: " + err);
    if (op == kBwdWeights) {
      // Every participant's sum has part 0's layout: add them, then to HWIO.
      int head = -1;
      for (int sl = 0; sl < slots; ++sl) {
        if (!has_sum[sl]) continue;
        if (head < 0) {
          head = sl;
          continue;
        }
        AddInto(sums[head], sums[sl], count);
      }
      if (e0.wei_reorder) {
        e0.reorder.execute(stream, sums[head], mw_user);
        stream.wait();
      } else {
        std::memcpy(wt, sums[head].get_data_handle(), count * sizeof(float));
      }
    }
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + err.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

ffi::Error Fwd(F32 x, F32 w, F32Result y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
               ffi::ThreadPool pool) {
  return Run(kFwd, x.typed_data(), y->typed_data(), w.typed_data(), x.dimensions(), y->dimensions(),
             w.dimensions(), sh, sw, pt, pb, pl, pr, pool);
}

ffi::Error BwdData(F32 dy, F32 w, F32Result dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr, ffi::ThreadPool pool) {
  return Run(kBwdData, dx->typed_data(), dy.typed_data(), w.typed_data(), dx->dimensions(), dy.dimensions(),
             w.dimensions(), sh, sw, pt, pb, pl, pr, pool);
}

ffi::Error BwdWeights(F32 x, F32 dy, F32Result dw, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr, ffi::ThreadPool pool) {
  return Run(kBwdWeights, x.typed_data(), dy.typed_data(), dw->typed_data(), x.dimensions(), dy.dimensions(),
             dw->dimensions(), sh, sw, pt, pb, pl, pr, pool);
}

#define CONV_ATTRS                                                                                     \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl") \
      .Attr<int64_t>("pr")                                                                             \
      .Ctx<ffi::ThreadPool>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxsam_onednn_conv_fwd, Fwd,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxsam_onednn_conv_bwd_data, BwdData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxsam_onednn_conv_bwd_weights, BwdWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);

// Wall nanoseconds spent inside the handlers since the library loaded (for the benchmark).
extern "C" int64_t jaxsam_onednn_conv_busy_ns() { return busy_ns.load(); }

// Number of cached primitives (for tests and the benchmark).
extern "C" int64_t jaxsam_onednn_conv_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}
