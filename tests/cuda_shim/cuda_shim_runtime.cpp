// The launcher of the CUDA shim (see cuda_shim.h): runs a kernel's grid on host threads, one per CUDA thread.
// Built once into a shared library that every kernel library links to.
//
// Execution model. A launch starts blockDim.x*y*z host threads, once, and each of them plays the same
// threadIdx in every block: the grid runs block by block (x fastest, then y, then z), and a block ends when
// all of its threads have returned from the kernel. __syncthreads() and the end of a block are phases of one
// std::barrier over the block's threads. Each phase must be reached by all threads in the same way: all at
// the same __syncthreads() line, or all at the end of the kernel. Anything else (a barrier in a divergent
// branch, an early return before a barrier) is undefined behaviour in CUDA; here it aborts the launch with a
// message naming the block and the source line, instead of hanging.
//
// Shared memory: every __shared__ variable of a kernel library lies in its section "cuda_shim_shared", which
// is filled with 0xFF bytes (NaN as float, -1 as int) before each block: a kernel reading shared memory that
// no thread of the block wrote (a missing __syncthreads(), a slot nobody fills) reads garbage, as it may on
// a GPU, rather than a plausible stale value. One launch runs at a time in the process (a mutex), so that
// one static copy per variable is one copy per block.
//
// Schedules: how the threads of a block interleave between two barriers. `parallel`: as the OS schedules
// them (truly concurrent). `in_order` / `reverse_order`: one thread at a time, by increasing / decreasing
// linear thread index, each running until its next __syncthreads() or the end of the kernel. Both serial
// orders are legal CUDA schedules, and deterministic: a thread that reads what another thread of its block
// wrote without a barrier in between runs before the writer in one of them, so such a race always shows.
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <latch>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};

#define CUDA_SHIM_API extern "C" __attribute__((visibility("default")))

extern "C" {
__attribute__((visibility("default"))) __thread uint3 threadIdx, blockIdx, blockDim, gridDim;
}

namespace {

enum class Schedule : int { parallel = 0, in_order = 1, reverse_order = 2 };

struct Aborted {};  // thrown out of __syncthreads() to unwind the threads of an aborted launch

// One launch: the block barrier, its divergence check, the serial schedules and shared memory.
class Launch {
 public:
  Launch(unsigned int n_threads, Schedule schedule, char* shared_begin, char* shared_end)
      : n_threads_(n_threads),
        schedule_(schedule),
        shared_begin_(shared_begin),
        shared_end_(shared_end),
        gates_(new Gate[n_threads]),
        barrier_(n_threads, Completion{this}) {}

  // Before the first block: garbage in shared memory, and the first thread of a serial schedule may run.
  void begin() {
    poison_shared();
    open(0);
  }

  // Called by every thread at a __syncthreads() (line > 0) or when it has finished the block (line 0).
  // Returns false when the launch is aborted: then every thread of the block leaves the launch.
  bool arrive(unsigned int rank, int line) {
    int expected = -1;
    if (!first_line_.compare_exchange_strong(expected, line) && expected != line) mixed_.store(true);
    if (line > 0) {
      n_sync_.fetch_add(1);
      sync_line_.store(line);
    }
    if (rank + 1 < n_threads_) open(rank + 1);
    barrier_.arrive_and_wait();
    return !aborted_.load();
  }

  // Serial schedules: block until it is this thread's turn.
  void wait_turn(unsigned int rank) {
    if (schedule_ == Schedule::parallel) return;
    Gate& gate = gates_[rank];
    std::unique_lock<std::mutex> lock(gate.mutex);
    gate.opened.wait(lock, [&] { return gate.open; });
    gate.open = false;
  }

  void abort(const std::string& message) {
    if (!aborted_.exchange(true)) error_ = message;
  }
  bool aborted() const { return aborted_.load(); }
  const std::string& error() const { return error_; }

 private:
  // A thread's turn to run in a serial schedule (a mutex and a condition variable rather than
  // std::atomic::wait, whose wake-ups libstdc++ 12 does not always deliver to the right waiter).
  struct Gate {
    std::mutex mutex;
    std::condition_variable opened;
    bool open = false;
  };

  void open(unsigned int rank) {
    if (schedule_ == Schedule::parallel) return;
    Gate& gate = gates_[rank];
    {
      std::lock_guard<std::mutex> lock(gate.mutex);
      gate.open = true;
    }
    gate.opened.notify_one();
  }

  void poison_shared() { std::memset(shared_begin_, 0xFF, shared_end_ - shared_begin_); }

  // Runs once per phase, in the last thread to arrive, before any thread is released.
  struct Completion {
    Launch* launch;
    void operator()() noexcept {
      Launch& s = *launch;
      if (s.mixed_.load()) {
        const unsigned int n_sync = s.n_sync_.load();
        char buf[320];
        std::snprintf(buf, sizeof buf,
                      "__syncthreads() not reached by every thread of block (%u, %u, %u): %u of %u threads "
                      "waited at a __syncthreads() (line %d of the kernel source, for one) while the others %s",
                      blockIdx.x, blockIdx.y, blockIdx.z, n_sync, s.n_threads_, s.sync_line_.load(),
                      n_sync == s.n_threads_ ? "waited at a different __syncthreads() line"
                                             : "had returned from the kernel");
        s.abort(buf);
      } else if (s.first_line_.load() == 0) {
        s.poison_shared();  // the block is over; the next one starts with garbage in shared memory
      }
      s.first_line_.store(-1);
      s.mixed_.store(false);
      s.n_sync_.store(0);
      s.open(0);
    }
  };

  const unsigned int n_threads_;
  const Schedule schedule_;
  char* const shared_begin_;
  char* const shared_end_;
  std::unique_ptr<Gate[]> gates_;    // serial schedules: gates_[r].open lets rank r run
  std::atomic<int> first_line_{-1};  // the line of the first arrival in this phase (0: end of the kernel)
  std::atomic<int> sync_line_{0};    // the line of some __syncthreads() arrival in this phase
  std::atomic<bool> mixed_{false};
  std::atomic<unsigned int> n_sync_{0};
  std::atomic<bool> aborted_{false};
  std::string error_;
  std::barrier<Completion> barrier_;
};

thread_local Launch* current_launch = nullptr;
thread_local unsigned int current_rank = 0;  // position of this thread in a serial schedule
std::mutex one_launch_at_a_time;

std::string dims(const char* what, const unsigned int* d) {
  return std::string(what) + " (" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " +
         std::to_string(d[2]) + ")";
}

// Runs body(ctx) on grid x block host threads. Returns 0, or 1 with a message in `error`.
int run(const unsigned int* grid, const unsigned int* block, Schedule schedule, void (*body)(void*), void* ctx,
        char* shared_begin, char* shared_end, std::string& error) {
  const unsigned long long n_threads = 1ull * block[0] * block[1] * block[2];
  if (n_threads == 0 || n_threads > 1024 || block[2] > 64) {
    error = "invalid " + dims("block", block) + ": each side >= 1, z <= 64 and at most 1024 threads";
    return 1;
  }
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 2147483647u || grid[1] > 65535 ||
      grid[2] > 65535) {
    error = "invalid " + dims("grid", grid) + ": x in [1, 2^31 - 1], y and z in [1, 65535]";
    return 1;
  }
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  Launch launch(static_cast<unsigned int>(n_threads), schedule, shared_begin, shared_end);
  std::latch start(1);  // no thread enters the kernel before all of them exist
  auto worker = [&](uint3 tid, unsigned int linear) {
    threadIdx = tid;
    blockDim = uint3{block[0], block[1], block[2]};
    gridDim = uint3{grid[0], grid[1], grid[2]};
    current_launch = &launch;
    current_rank = schedule == Schedule::reverse_order ? static_cast<unsigned int>(n_threads) - 1 - linear
                                                       : linear;
    start.wait();
    if (launch.aborted()) return;
    for (unsigned int z = 0; z < grid[2]; ++z)
      for (unsigned int y = 0; y < grid[1]; ++y)
        for (unsigned int x = 0; x < grid[0]; ++x) {
          blockIdx = uint3{x, y, z};
          launch.wait_turn(current_rank);
          try {
            body(ctx);
          } catch (const Aborted&) {
            return;
          }
          if (!launch.arrive(current_rank, 0)) return;
        }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads);
  try {
    for (unsigned int z = 0; z < block[2]; ++z)
      for (unsigned int y = 0; y < block[1]; ++y)
        for (unsigned int x = 0; x < block[0]; ++x)
          threads.emplace_back(worker, uint3{x, y, z}, static_cast<unsigned int>(threads.size()));
  } catch (const std::system_error& e) {
    launch.abort(std::string("could not start the host threads of a block: ") + e.what());
  }
  launch.begin();
  start.count_down();
  for (std::thread& t : threads) t.join();
  if (launch.aborted()) {
    error = launch.error();
    return 1;
  }
  return 0;
}

}  // namespace

CUDA_SHIM_API void cuda_shim_syncthreads(int line) {
  if (!current_launch->arrive(current_rank, line)) throw Aborted{};
  current_launch->wait_turn(current_rank);
}

// grid, block: 3 sides each. schedule: 0 parallel, 1 in_order, 2 reverse_order. shared_begin/end: the
// __shared__ section of the kernel's library. Returns 0, or 1 with a message in err when the launch was
// refused (a grid or block CUDA would refuse) or aborted (a __syncthreads() not reached by every thread).
CUDA_SHIM_API int cuda_shim_run(const unsigned int* grid, const unsigned int* block, int schedule,
                                void (*body)(void*), void* ctx, char* shared_begin, char* shared_end,
                                char* err, std::size_t err_len) {
  std::string error;
  const int rc = run(grid, block, static_cast<Schedule>(schedule), body, ctx, shared_begin, shared_end, error);
  if (rc != 0 && err_len > 0) {
    std::strncpy(err, error.c_str(), err_len - 1);
    err[err_len - 1] = '\0';
  }
  return rc;
}
