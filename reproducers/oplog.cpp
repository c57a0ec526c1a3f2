// The live op log (reproducers/oplog.py): every top-level ATen op a step runs, with the dtype and
// shape of each tensor it is given, kept by a RecordFunction callback in C++. A Python dispatch mode
// costs about 2x a step of small ops before it records anything; this about 1.3 us an op, because
// no Python runs per op and nothing is hashed: the values are taken later, when the flight recorder
// re-executes the step, and this log proves that re-execution ran the same ops.
//
// "Top-level": an op entered while another ATen op of the same thread is running (a composite op's
// parts, what a dispatch mode or a fault injector runs inside an op) is not logged. A Python dispatch
// mode does change some top-level ops (autograd accumulates gradients out of place under one), so the
// flight recorder compares a live step with a re-execution under the same modes: its capture's own
// mode is not around the check. Nested ops are kept out by switching RecordFunction off on the
// thread while a top-level op runs (nothing of theirs is boxed); when a profiler is running as the log
// starts, that would hide them from it too, so the log then counts depth on each thread instead
// (slower: nested ops' arguments are boxed; the profiler costs far more).
//
// Built with -DNDEBUG like torch itself: RecordFunction's layout differs without it.

#include <torch/extension.h>
#include <ATen/record_function.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// One op: its name's index, its thread's index, then per argument a code and its payload:
//   tensor: -(100 + scalar type), ndim, sizes...   undefined tensor: -2
//   tensor list: -3, count, then each tensor as above
//   nested tensor: -(100 + scalar type), -1         arguments unreadable: -4 (alone)
struct Log {
  std::vector<int32_t> name;
  std::vector<int32_t> thread;
  std::vector<int64_t> offset;  // start of each op's codes in `codes`
  std::vector<int64_t> codes;
  std::vector<std::string> names;
  std::unordered_map<std::string, int32_t> name_ids;
  std::unordered_map<const char*, int32_t> name_ptrs;
  std::unordered_map<uint64_t, int32_t> thread_ids;  // by first appearance in this log
};

std::mutex mu;
Log current;
bool running = false;
std::atomic<bool> by_depth{false};  // a profiler is running: count depth, leave RecordFunction on
thread_local int depth = 0;
at::CallbackHandle handle = 0;
thread_local std::vector<int64_t> scratch;
std::atomic<uint64_t> next_thread{1};
thread_local uint64_t thread_key = 0;

void put_tensor(std::vector<int64_t>& out, const at::Tensor& t) {
  if (!t.defined()) {
    out.push_back(-2);
    return;
  }
  out.push_back(-100 - static_cast<int64_t>(t.scalar_type()));
  if (t.is_nested()) {  // no sizes() to read: its dtype only
    out.push_back(-1);
    return;
  }
  out.push_back(t.dim());
  for (auto s : t.sizes()) out.push_back(s);
}

// A dispatcher op's record is named "namespace::op". Other records of the same scope are not ops and
// are passed through, neither logged nor counted as enclosing: the autograd engine's
// "autograd::engine::evaluate_function: MmBackward0" (around the backward ops it runs, which are the
// step's ops), "PythonDispatchMode" (around a dispatch mode's Python, present only under one).
bool is_op(const char* name) {
  return std::strstr(name, "::") != nullptr && std::strchr(name, ' ') == nullptr;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  const char* op = fn.name();
  if (!is_op(op)) return nullptr;
  // What this op runs inside it is not top-level: RecordFunction is switched off on this thread
  // until the op ends (and on threads torch hands work to with its thread-local state, as
  // at::launch does), so nested ops are neither boxed nor seen, and such a worker's ops are not
  // taken for top-level ones of another thread.
  if (by_depth.load(std::memory_order_relaxed)) {
    if (depth++ > 0) return nullptr;
  } else {
    at::enableRecordFunction(false);
  }
  if (thread_key == 0) thread_key = next_thread++;
  std::vector<int64_t>& codes = scratch;
  codes.clear();
  try {
    for (const auto& v : fn.inputs()) {
      if (v.isTensor()) {
        put_tensor(codes, v.toTensor());
      } else if (v.isTensorList()) {
        auto list = v.toTensorList();
        codes.push_back(-3);
        codes.push_back(static_cast<int64_t>(list.size()));
        for (const at::Tensor& t : list) put_tensor(codes, t);
      }
    }
  } catch (const std::exception&) {  // a tensor whose metadata cannot be read (symbolic sizes): the op, marked
    codes.assign(1, -4);
  }
  std::lock_guard<std::mutex> g(mu);
  if (!running) return nullptr;
  int32_t id;
  auto n = current.name_ptrs.find(op);  // dispatcher op names are stable strings: by address first
  if (n != current.name_ptrs.end() && current.names[n->second] == op) {
    id = n->second;
  } else {
    auto s = current.name_ids.find(op);
    if (s == current.name_ids.end()) {
      id = static_cast<int32_t>(current.names.size());
      current.names.emplace_back(op);
      current.name_ids.emplace(current.names.back(), id);
    } else {
      id = s->second;
    }
    current.name_ptrs[op] = id;
  }
  auto t = current.thread_ids.find(thread_key);
  int32_t tid;
  if (t == current.thread_ids.end()) {
    tid = static_cast<int32_t>(current.thread_ids.size());
    current.thread_ids.emplace(thread_key, tid);
  } else {
    tid = t->second;
  }
  current.name.push_back(id);
  current.thread.push_back(tid);
  current.offset.push_back(static_cast<int64_t>(current.codes.size()));
  current.codes.insert(current.codes.end(), codes.begin(), codes.end());
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (!is_op(fn.name())) return;
  if (by_depth.load(std::memory_order_relaxed)) {
    --depth;
  } else {
    at::enableRecordFunction(true);
  }
}

template <class T>
py::bytes raw(const std::vector<T>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

}  // namespace

void start(bool profiled) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(!running, "an op log is already being kept in this process");
  current = Log();
  running = true;
  by_depth = profiled;
  handle = at::addGlobalCallback(
      at::RecordFunctionCallback(on_start, on_end).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
}

py::tuple stop() {
  at::removeCallback(handle);
  Log done;
  {
    std::lock_guard<std::mutex> g(mu);
    running = false;
    std::swap(done, current);
  }
  done.offset.push_back(static_cast<int64_t>(done.codes.size()));
  std::vector<std::string> dtypes;  // by c10::ScalarType value, as the codes hold them
  for (int i = 0; i < static_cast<int>(c10::ScalarType::NumOptions); ++i)
    dtypes.emplace_back(c10::toString(static_cast<c10::ScalarType>(i)));
  return py::make_tuple(done.names, dtypes, raw(done.name), raw(done.thread), raw(done.offset), raw(done.codes));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("start", &start, "Start keeping the op log (global, every thread); profiled: a profiler is running");
  m.def("stop", &stop, "Stop; returns (names, dtype names, name index, thread index, offsets, codes)");
}
