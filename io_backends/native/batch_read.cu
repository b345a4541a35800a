// Batched reads of open files into host or GPU memory, C ABI (loaded with ctypes by io_backends/native/__init__.py).
//
// One call reads every range of a batch (many files, header and payload each) on a pool of worker threads and
// returns when all have landed, so the Python caller pays one call per batch instead of several per file. A range
// bound for a GPU is read piece by piece into the worker's pinned staging buffer by pread(2) and copied to the
// device on the worker's own stream: the POSIX path kvikio takes without GPUDirect, minus its per-file Python.
//
// Who reads which piece: the worker that takes a range asks the page cache for its first piece (RWF_NOWAIT). If it
// is there, the range's other pieces go to every idle worker at once (memory copies: the more threads the faster).
// If not, that worker reads the range to its end, so the kernel sees one sequential stream per file and its
// readahead keeps the disk busy (8 workers on pieces of one cold file read 10-20% slower on the lent VMs).
// Pieces alternate between two staging halves, so a worker's next pread overlaps the copy of its last piece; a
// piece is finished as soon as its copy is seen to have ended.
//
// Results, per range: the bytes read, or -errno (an OS error), or -kShortFile (the file ends before the range does),
// or -(kCudaErrorBase + cudaError_t) for a failed CUDA call (gio_cuda_error_name names it). No C++ exception leaves
// the library: a pool that cannot start a thread makes gio_read return -EAGAIN.

#include <cuda_runtime.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

extern "C" struct gio_range {  // one contiguous read; RANGE in io_backends/native/__init__.py has its layout
  int32_t fd;
  int32_t device;  // CUDA device of dst, or -1 for host memory
  int64_t offset;  // in the file
  int64_t nbytes;
  uint64_t dst;
  int64_t result;  // out
};

namespace {

using Range = gio_range;

constexpr int64_t kShortFile = 99999;
constexpr int64_t kCudaErrorBase = 100000;

struct Batch {
  Range* ranges;
  std::vector<std::atomic<int64_t>> errors;  // per range: 0, or the first failure of its pieces
  int64_t remaining;  // pieces not finished, under mutex: the caller frees the batch once it reads 0
  std::mutex mutex;
  std::condition_variable done;
  Batch(Range* r, int n, int64_t pieces) : ranges(r), errors(n), remaining(pieces) {}

  void fail(int index, int64_t code) {
    int64_t none = 0;
    errors[index].compare_exchange_strong(none, code);
  }
  bool failed(int index) const { return errors[index].load() != 0; }
  void finish_piece() {
    std::lock_guard<std::mutex> lock(mutex);
    if (--remaining == 0) done.notify_all();
  }
};

struct Piece {
  Batch* batch;
  int index;       // the range
  int64_t start;   // offset within the range
  int64_t nbytes;  // queued: the whole range
};

// pread until nbytes have come or the file ends: 0, -errno, or -kShortFile
int64_t pread_all(int fd, char* dst, int64_t nbytes, int64_t offset) {
  while (nbytes > 0) {
    const ssize_t got = pread(fd, dst, (size_t)nbytes, (off_t)offset);
    if (got < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (got == 0) return -kShortFile;
    dst += got, offset += got, nbytes -= got;
  }
  return 0;
}

int64_t cuda_code(cudaError_t err) { return -(kCudaErrorBase + (int64_t)err); }

std::atomic<bool> nowait_works{true};  // cleared where the kernel or filesystem refuses RWF_NOWAIT

// Copy [offset, offset + nbytes) into dst only if the page cache holds all of it (no disk wait); false otherwise
// (dst then holds unspecified bytes).
bool in_page_cache(int fd, char* dst, int64_t nbytes, int64_t offset) {
  if (!nowait_works.load(std::memory_order_relaxed)) return false;
  struct iovec iov = {dst, (size_t)nbytes};
  const ssize_t got = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
  if (got < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) nowait_works.store(false);
  return got == nbytes;
}

// A worker's GPU state: a stream per device, and pinned staging in two halves whose copies may be in flight.
class Staging {
 public:
  ~Staging() {
    for (auto& slot : slots_) {
      if (slot.event != nullptr) cudaEventDestroy(slot.event);
    }
    for (auto& kv : streams_) cudaStreamDestroy(kv.second);
    if (host_ != nullptr) cudaFreeHost(host_);
  }

  // Read one GPU-bound piece through a free half and start its copy; the piece is finished when the copy is.
  // With `probe`, the page cache is asked first (RWF_NOWAIT); true when it held the whole piece.
  bool read(const Piece& piece, int64_t capacity, bool probe) {
    Range& r = piece.batch->ranges[piece.index];
    if (piece.batch->failed(piece.index)) {  // an earlier piece failed the range: the rest need not be read
      piece.batch->finish_piece();
      return false;
    }
    cudaStream_t stream = nullptr;
    int64_t code = stream_for(r.device, &stream);  // first: the thread's CUDA calls then go to r.device, not GPU 0
    if (code == 0) code = reserve(capacity);
    poll();  // copies done by now finish their pieces at once, not when their half is next needed
    Slot& slot = slots_[next_];
    settle(slot);  // its previous copy must be done before pread overwrites it
    if (code == 0) code = event_for(slot, r.device);
    char* buf = host_ + (int64_t)next_ * capacity_;
    const bool cached = code == 0 && probe && in_page_cache(r.fd, buf, piece.nbytes, r.offset + piece.start);
    if (code == 0 && !cached) code = pread_all(r.fd, buf, piece.nbytes, r.offset + piece.start);
    if (code == 0) {
      char* dst = reinterpret_cast<char*>(r.dst) + piece.start;
      cudaError_t err = cudaMemcpyAsync(dst, buf, (size_t)piece.nbytes, cudaMemcpyHostToDevice, stream);
      if (err == cudaSuccess) {
        err = cudaEventRecord(slot.event, stream);
        if (err != cudaSuccess) cudaStreamSynchronize(stream);  // the copy may be queued: it ends before we go on
      }
      if (err == cudaSuccess) {
        slot.piece = piece;
        slot.busy = true;
        next_ ^= 1;
        return cached;
      }
      code = cuda_code(err);
    }
    piece.batch->fail(piece.index, code);
    piece.batch->finish_piece();
    return false;
  }

  // Wait for every copy in flight and finish its piece (before the worker sleeps).
  void drain() {
    for (auto& slot : slots_) settle(slot);
  }

  // Finish the pieces whose copies have ended, without waiting for the others.
  void poll() {
    for (auto& slot : slots_) {
      if (slot.busy && cudaEventQuery(slot.event) != cudaErrorNotReady) settle(slot);
    }
  }

 private:
  struct Slot {
    cudaEvent_t event = nullptr;
    int event_device = -1;
    Piece piece{};
    bool busy = false;
  };

  int64_t reserve(int64_t capacity) {
    if (capacity <= capacity_) return 0;
    drain();
    if (host_ != nullptr) cudaFreeHost(host_);
    host_ = nullptr, capacity_ = 0;
    cudaError_t err = cudaHostAlloc(reinterpret_cast<void**>(&host_), (size_t)(2 * capacity), cudaHostAllocPortable);
    if (err != cudaSuccess) return cuda_code(err);
    capacity_ = capacity;
    return 0;
  }

  int64_t stream_for(int device, cudaStream_t* out) {
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return cuda_code(err);
    auto found = streams_.find(device);
    if (found == streams_.end()) {
      cudaStream_t stream;
      err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
      if (err != cudaSuccess) return cuda_code(err);
      found = streams_.emplace(device, stream).first;
    }
    *out = found->second;
    return 0;
  }

  // An event of `device` for a settled slot (an event is recorded only on a stream of its own device).
  static int64_t event_for(Slot& slot, int device) {
    if (slot.event != nullptr && slot.event_device == device) return 0;
    if (slot.event != nullptr) cudaEventDestroy(slot.event);
    slot.event = nullptr;
    const cudaError_t err = cudaEventCreateWithFlags(&slot.event, cudaEventDisableTiming);
    if (err != cudaSuccess) return cuda_code(err);
    slot.event_device = device;
    return 0;
  }

  static void settle(Slot& slot) {
    if (!slot.busy) return;
    slot.busy = false;
    const cudaError_t err = cudaEventSynchronize(slot.event);
    if (err != cudaSuccess) slot.piece.batch->fail(slot.piece.index, cuda_code(err));
    slot.piece.batch->finish_piece();
  }

  char* host_ = nullptr;
  int64_t capacity_ = 0;
  int next_ = 0;
  Slot slots_[2];
  std::unordered_map<int, cudaStream_t> streams_;
};

class Pool {
 public:
  explicit Pool(int64_t piece_bytes) : piece_bytes_(piece_bytes) {}

  // Start workers up to `threads` (the most any caller asked for: the pool is shared and never shrinks); false when
  // not even one runs. A thread that cannot start leaves the pool as large as it got.
  bool grow(int threads) {
    std::lock_guard<std::mutex> lock(mutex_);
    try {
      while (started_ < threads) {
        std::thread([this] { run(); }).detach();  // the pool lives as long as the process
        ++started_;
      }
    } catch (const std::exception&) {
    }
    return started_ > 0;
  }

  void run_batch(Range* ranges, int n) {
    int64_t pieces = 0;  // a GPU range is finished piece by piece (as its copies end), a host range at once
    for (int i = 0; i < n; ++i) pieces += ranges[i].device < 0 ? 1 : pieces_of(ranges[i].nbytes);
    Batch batch(ranges, n, pieces);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      try {
        for (int pass = 0; pass < 2; ++pass) {  // GPU ranges first: their copies overlap the host ranges' reads
          for (int i = 0; i < n; ++i) {
            if ((ranges[i].device >= 0) == (pass == 0)) queue_.push_back(Piece{&batch, i, 0, ranges[i].nbytes});
          }
        }
      } catch (...) {  // no worker has seen this batch (the lock is held): take its pieces back
        while (!queue_.empty() && queue_.back().batch == &batch) queue_.pop_back();
        throw;
      }
    }
    work_.notify_all();
    std::unique_lock<std::mutex> lock(batch.mutex);
    batch.done.wait(lock, [&] { return batch.remaining == 0; });
    for (int i = 0; i < n; ++i) {
      const int64_t err = batch.errors[i].load();
      ranges[i].result = err != 0 ? err : ranges[i].nbytes;
    }
  }

 private:
  void run() {
    Staging staging;
    for (;;) {
      Piece piece;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (queue_.empty()) {
          lock.unlock();
          staging.drain();  // nothing else to overlap with: finish the copies in flight
          lock.lock();
          work_.wait(lock, [this] { return !queue_.empty(); });
        }
        piece = queue_.front();
        queue_.pop_front();
      }
      staging.poll();
      Range& r = piece.batch->ranges[piece.index];
      if (piece.nbytes <= 0) {
        piece.batch->finish_piece();
      } else if (r.device < 0) {
        const int64_t code = pread_all(r.fd, reinterpret_cast<char*>(r.dst), r.nbytes, r.offset);
        if (code != 0) piece.batch->fail(piece.index, code);
        piece.batch->finish_piece();
      } else if (piece.start > 0) {  // a piece of a range found in the page cache
        staging.read(piece, piece_bytes_, false);
      } else {
        // the batch (and `r`) may be gone once its last piece is finished: nothing below reads them after that
        const int64_t total = r.nbytes;
        if (staging.read(Piece{piece.batch, piece.index, 0, std::min(piece_bytes_, total)}, piece_bytes_, true)) {
          std::lock_guard<std::mutex> lock(mutex_);  // in the page cache: the rest goes to every idle worker
          auto at_front = queue_.begin();
          int64_t at = piece_bytes_;
          try {
            for (; at < total; at += piece_bytes_) {
              at_front = queue_.insert(at_front, Piece{piece.batch, piece.index, at, std::min(piece_bytes_, total - at)});
              ++at_front;
            }
          } catch (...) {  // no memory to queue them: the pieces not queued fail the range
            piece.batch->fail(piece.index, -ENOMEM);
            for (; at < total; at += piece_bytes_) piece.batch->finish_piece();
          }
          work_.notify_all();
        } else {  // from disk: read by this worker to the end, one sequential stream for the kernel's readahead
          for (int64_t at = piece_bytes_; at < total; at += piece_bytes_) {
            staging.read(Piece{piece.batch, piece.index, at, std::min(piece_bytes_, total - at)}, piece_bytes_, false);
          }
        }
      }
    }
  }

  int64_t pieces_of(int64_t nbytes) const { return std::max<int64_t>(1, (nbytes + piece_bytes_ - 1) / piece_bytes_); }

  const int64_t piece_bytes_;
  std::mutex mutex_;
  std::condition_variable work_;
  std::deque<Piece> queue_;
  int started_ = 0;
};

std::mutex pools_mutex;
std::unordered_map<int64_t, std::unique_ptr<Pool>>* pools = nullptr;  // by piece size
// The lock is held across fork(), so a child never inherits it taken by a thread that does not exist there; the
// child drops its parent's pools (their workers did not come along) without touching them.
const int fork_guard = pthread_atfork([] { pools_mutex.lock(); }, [] { pools_mutex.unlock(); }, [] {
  pools = nullptr;
  pools_mutex.unlock();
});

Pool* pool_for(int64_t piece_bytes, int threads) {
  std::lock_guard<std::mutex> lock(pools_mutex);
  if (pools == nullptr) pools = new std::unordered_map<int64_t, std::unique_ptr<Pool>>();
  auto& pool = (*pools)[piece_bytes];
  if (!pool) pool.reset(new Pool(piece_bytes));
  return pool->grow(threads) ? pool.get() : nullptr;
}

}  // namespace

extern "C" {

int gio_range_size() { return (int)sizeof(Range); }

// Read every range of `ranges[0, n)` in pieces of at most `piece_bytes` (a multiple of 4096) on the process's pool
// for that piece size, grown to `threads` workers if smaller (it never shrinks; each worker keeps 2 x piece_bytes
// of pinned staging); returns when all have landed (or failed), results in each range's `result`. 0; -EINVAL for
// bad arguments, -EAGAIN where no worker thread can start, -ENOMEM where the batch cannot be queued (nothing read).
int gio_read(Range* ranges, int n, int threads, int64_t piece_bytes) {
  if (n < 0 || threads < 1 || piece_bytes < 4096 || piece_bytes % 4096 != 0) return -EINVAL;
  for (int i = 0; i < n; ++i) {
    if (ranges[i].nbytes < 0 || ranges[i].offset < 0 || (ranges[i].nbytes > 0 && ranges[i].dst == 0)) return -EINVAL;
  }
  if (n == 0) return 0;
  try {
    Pool* pool = pool_for(piece_bytes, threads);
    if (pool == nullptr) return -EAGAIN;
    pool->run_batch(ranges, n);
  } catch (const std::exception&) {
    return -ENOMEM;
  }
  return 0;
}

const char* gio_cuda_error_name(int err) { return cudaGetErrorName((cudaError_t)err); }

}  // extern "C"
