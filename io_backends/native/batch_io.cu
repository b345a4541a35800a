// Batched file reads and writes between files and host or GPU memory, C ABI (loaded with ctypes by
// io_backends/native/__init__.py).
//
// One call reads every range of a batch (many files, header and payload each), or every file of a batch whole, or
// writes and publishes every file of a batch, on a pool of worker threads and returns when all are done, so the
// Python caller pays one call per batch instead of several per file. GPU memory goes piece by piece through the
// worker's pinned staging buffer and the worker's own stream: the POSIX path kvikio takes without GPUDirect, minus
// its per-file Python.
//
// Reads (gio_read_begin then gio_read_finish, so that the caller can check one batch while the next is read;
// gio_read_files_begin for files read whole: a worker opens each file, checks its size, reads its head to the host
// and its body, and the worker that lands its last piece closes it, touching it where asked)
//
// Who reads which piece: the worker that takes a range asks the page cache for its first piece (RWF_NOWAIT). If it
// is there, the range's other pieces go to every idle worker at once (memory copies: the more threads the faster).
// If not, that worker reads the range to its end, so the kernel sees one sequential stream per file and its
// readahead keeps the disk busy (8 workers on pieces of one cold file read 10-20% slower on the lent VMs).
// Pieces alternate between two staging halves, so a worker's next pread overlaps the copy of its last piece; a
// piece is finished as soon as its copy is seen to have ended.
//
// Writes (gio_write_begin, then gio_write_finish, so that the caller can prepare the last ranges, a header, while
// the first are written): each file is created under its temporary name and written by one worker, range by range;
// a GPU range's pieces are copied to staging on the worker's stream, the next piece's copy overlapping the last
// one's pwrite, and go to disk through an O_DIRECT descriptor where asked and aligned (the page cache otherwise).
// Once every file of the batch is written, each is fsynced (all at once, so a journaling filesystem commits them
// together), closed and renamed to its final name; a file that failed anywhere is unlinked instead.
//
// Reads and writes have pools of their own, so a retrieve never waits for workers busy with a store's files (a
// serving engine loads one request's KV while it saves another's; a 32 MiB file takes a worker ~100 ms).
//
// Results, per range or file: the bytes read (0 for a file read whole or published), or -errno (an OS error), or
// -kShortFile (the file ends before the range does), or -kSizeChanged (a file to read whole is larger than its
// caller said), or -(kCudaErrorBase + cudaError_t) for a failed CUDA call (gio_cuda_error_name names it). No C++
// exception leaves the library: a pool that cannot start a thread makes a call return -EAGAIN.

#include <cuda_runtime.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
#include <sys/stat.h>
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

extern "C" struct gio_whole {  // one file to read whole; WHOLE in io_backends/native/__init__.py has its layout
  uint64_t path;   // NUL-terminated
  int64_t size;    // in: the most bytes it may have (a larger file is not read: -kSizeChanged); out: its size
  uint64_t head;   // host memory for its first head_bytes
  uint64_t body;   // memory on `device` for the rest
  int32_t device;  // CUDA device of body, or -1 for host memory
  int32_t touch;   // set the file's times to now once it is read whole
  int64_t result;  // out: 0, or the first failure
};

extern "C" struct gio_file {  // one file to publish; FILE in io_backends/native/__init__.py has its layout
  uint64_t tmp;   // NUL-terminated path written first
  uint64_t path;  // NUL-terminated path it is renamed to
  int64_t result;  // out: 0, or the file's first failure (it was then unlinked)
};

extern "C" struct gio_wrange {  // one contiguous write into a file of the batch; WRANGE has its layout
  int32_t file;    // index into the batch's files
  int32_t device;  // CUDA device of src, or -1 for host memory
  int64_t offset;  // in the file
  int64_t nbytes;
  uint64_t src;
};

namespace {

using Range = gio_range;

constexpr int64_t kShortFile = 99999;
constexpr int64_t kSizeChanged = 99998;
constexpr int64_t kCudaErrorBase = 100000;

// Jobs of a batch not finished yet: the batch's caller waits for none to be left (and may then free the batch).
struct Countdown {
  int64_t remaining = 0;  // under mutex
  std::mutex mutex;
  std::condition_variable done;
  void reset(int64_t n) {
    std::lock_guard<std::mutex> lock(mutex);
    remaining = n;
  }
  void finish_one() {
    std::lock_guard<std::mutex> lock(mutex);
    if (--remaining == 0) done.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [&] { return remaining == 0; });
  }
};

struct Batch {
  Range* ranges;
  pid_t pid = getpid();  // a forked child has none of the pool's workers
  std::vector<std::atomic<int64_t>> errors;  // per range: 0, or the first failure of its pieces
  Countdown pieces;  // a GPU range's pieces finish one by one, as their copies end
  // Files read whole (gio_read_files_begin): file i's head is range 2i, its body range 2i + 1 (in `own`, their fd
  // set once a worker has opened it); the last of its pieces to finish closes it.
  gio_whole* files = nullptr;
  std::vector<Range> own;
  std::vector<std::atomic<int64_t>> left;  // per file: pieces not finished
  Batch(Range* r, int n, int64_t count) : ranges(r), errors(n) { pieces.reset(count); }
  Batch(gio_whole* f, int n, int64_t head_bytes, int64_t piece_bytes);

  void fail(int index, int64_t code) {
    int64_t none = 0;
    errors[index].compare_exchange_strong(none, code);
  }
  bool failed(int index) const { return errors[index].load() != 0; }
  void finish_piece(int index) {
    if (files != nullptr && left[index / 2].fetch_sub(1) == 1) close_file(index / 2);
    pieces.finish_one();
  }
  void close_file(int i) {
    const int fd = own[2 * i].fd;
    if (fd < 0) return;
    if (files[i].touch && !failed(2 * i) && !failed(2 * i + 1)) futimens(fd, nullptr);  // best effort
    close(fd);
  }
};

int64_t pieces_of(int64_t nbytes, int64_t piece_bytes) {
  return std::max<int64_t>(1, (nbytes + piece_bytes - 1) / piece_bytes);
}

// A range's pieces: a GPU range is finished piece by piece (as its copies end), a host range at once.
int64_t pieces_of(const Range& r, int64_t piece_bytes) { return r.device < 0 ? 1 : pieces_of(r.nbytes, piece_bytes); }

Batch::Batch(gio_whole* f, int n, int64_t head_bytes, int64_t piece_bytes)
    : ranges(nullptr), errors(2 * n), files(f), own(2 * n), left(n) {
  int64_t count = 0;
  for (int i = 0; i < n; ++i) {
    own[2 * i] = Range{-1, -1, 0, head_bytes, f[i].head, 0};
    own[2 * i + 1] = Range{-1, f[i].device, head_bytes, std::max<int64_t>(0, f[i].size - head_bytes), f[i].body, 0};
    left[i] = 1 + pieces_of(own[2 * i + 1], piece_bytes);
    count += left[i];
  }
  ranges = own.data();
  pieces.reset(count);
}

struct Piece {
  Batch* batch;
  int index;       // the range
  int64_t start;   // offset within the range, or kOpen: open file index / 2 of a batch of files read whole
  int64_t nbytes;  // queued: the whole range
};

constexpr int64_t kOpen = -1;

class Pool;

// One file-publishing batch: phase 1 creates and writes each file (one job per file), phase 2 writes the ranges
// given at finish, then syncs, closes and renames each file.
struct WriteBatch {
  gio_file* files;
  std::vector<std::vector<const gio_wrange*>> ranges;  // per file, in the caller's order: phase 1
  std::vector<std::vector<gio_wrange>> later;          // per file: phase 2
  std::vector<int> fds, direct_fds;                    // per file, -1 where not open
  bool durable, direct;
  bool abandon = false;  // phase 2 unlinks every file
  Pool* pool = nullptr;
  pid_t pid = getpid();  // a forked child has neither the pool's workers nor the files' writes
  Countdown jobs;        // of the current phase
  WriteBatch(gio_file* f, int n, const gio_wrange* r, int nr, bool sync, bool odirect)
      : files(f), ranges(n), later(n), fds(n, -1), direct_fds(n, -1), durable(sync), direct(odirect) {
    for (int i = 0; i < nr; ++i) ranges[r[i].file].push_back(&r[i]);
    for (int i = 0; i < n; ++i) files[i].result = 0;
  }
};

// What a worker takes from the queue: a piece of a read, or a file of a write batch (`write` set) in one phase.
struct Job {
  Piece piece{};
  WriteBatch* write = nullptr;
  int file = 0;
  bool publish = false;  // phase 2
  Job() = default;
  Job(const Piece& p) : piece(p) {}  // NOLINT: reads queue their pieces as they are
  Job(WriteBatch* w, int f, bool second) : write(w), file(f), publish(second) {}
};

// Call `io` (pread or pwrite) until all nbytes have moved: 0, -errno, or `at_none` when a call moves nothing.
template <typename Io, typename Buffer>
int64_t repeat(Io io, int fd, Buffer* buf, int64_t nbytes, int64_t offset, int64_t at_none) {
  while (nbytes > 0) {
    const ssize_t moved = io(fd, buf, (size_t)nbytes, (off_t)offset);
    if (moved < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (moved == 0) return at_none;
    buf += moved, offset += moved, nbytes -= moved;
  }
  return 0;
}

// pwrite all nbytes: 0 or -errno
int64_t pwrite_all(int fd, const char* src, int64_t nbytes, int64_t offset) {
  return repeat(pwrite, fd, src, nbytes, offset, -EIO);
}

// Write a staged piece: its 4 KiB-aligned part through `direct_fd` where there is one and the offset is aligned (a
// filesystem that refuses it at write time gets the page cache instead), the rest through `fd`.
int64_t pwrite_piece(int fd, int direct_fd, const char* src, int64_t nbytes, int64_t offset) {
  const int64_t aligned = direct_fd >= 0 && offset % 4096 == 0 ? nbytes / 4096 * 4096 : 0;
  if (aligned > 0) {
    int64_t code = pwrite_all(direct_fd, src, aligned, offset);
    if (code == -EINVAL) code = pwrite_all(fd, src, aligned, offset);
    if (code != 0) return code;
  }
  return pwrite_all(fd, src + aligned, nbytes - aligned, offset + aligned);
}

// pread until nbytes have come or the file ends: 0, -errno, or -kShortFile
int64_t pread_all(int fd, char* dst, int64_t nbytes, int64_t offset) {
  return repeat(pread, fd, dst, nbytes, offset, -kShortFile);
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
      piece.batch->finish_piece(piece.index);
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
    piece.batch->finish_piece(piece.index);
    return false;
  }

  // Write one GPU range to the file: pieces copied to the staging halves in turn, each piece's pwrite overlapping
  // the next one's copy. 0 or a negative code; no copy of this range is in flight when it returns.
  int64_t write(const gio_wrange& r, int fd, int direct_fd, int64_t capacity) {
    drain();  // the halves may hold read copies (none in the write pool, but a Pool takes either kind of job)
    cudaStream_t stream = nullptr;
    int64_t code = stream_for(r.device, &stream);
    if (code == 0) code = reserve(capacity);
    for (auto& slot : slots_) {
      if (code == 0) code = event_for(slot, r.device);
    }
    if (code != 0) return code;
    const char* src = reinterpret_cast<const char*>(r.src);
    auto start_copy = [&](int64_t at) -> int64_t {
      char* buf = host_ + (at / capacity_ % 2) * capacity_;
      cudaError_t err = cudaMemcpyAsync(buf, src + at, (size_t)std::min(capacity_, r.nbytes - at),
                                        cudaMemcpyDeviceToHost, stream);
      if (err == cudaSuccess) err = cudaEventRecord(slots_[at / capacity_ % 2].event, stream);
      return err == cudaSuccess ? 0 : cuda_code(err);
    };
    code = r.nbytes > 0 ? start_copy(0) : 0;
    for (int64_t at = 0; code == 0 && at < r.nbytes; at += capacity_) {
      if (at + capacity_ < r.nbytes) code = start_copy(at + capacity_);  // the half of the piece before this one
      const cudaError_t err = cudaEventSynchronize(slots_[at / capacity_ % 2].event);
      if (code == 0 && err != cudaSuccess) code = cuda_code(err);
      if (code == 0) {
        code = pwrite_piece(fd, direct_fd, host_ + (at / capacity_ % 2) * capacity_,
                            std::min(capacity_, r.nbytes - at), r.offset + at);
      }
    }
    if (code != 0) cudaStreamSynchronize(stream);  // a copy started may still be landing in a half
    return code;
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
      try {
        found = streams_.emplace(device, stream).first;
      } catch (const std::exception&) {  // a worker must not die of an exception
        cudaStreamDestroy(stream);
        return -ENOMEM;
      }
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
    slot.piece.batch->finish_piece(slot.piece.index);
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

  // Queue every range of a batch of reads (allocated by the caller, who waits for it with end_batch).
  Batch* start_batch(Range* ranges, int n) {
    int64_t pieces = 0;
    for (int i = 0; i < n; ++i) pieces += pieces_of(ranges[i], piece_bytes_);
    auto batch = std::make_unique<Batch>(ranges, n, pieces);
    queue_all(batch.get(), [&](auto push) {
      for (int pass = 0; pass < 2; ++pass) {  // GPU ranges first: their copies overlap the host ranges' reads
        for (int i = 0; i < n; ++i) {
          if ((ranges[i].device >= 0) == (pass == 0)) push(Piece{batch.get(), i, 0, ranges[i].nbytes});
        }
      }
    });
    return batch.release();
  }

  // Queue every file of a batch of files to read whole: one job each, which opens it (end_batch waits for it).
  Batch* start_files(gio_whole* files, int n, int64_t head_bytes) {
    auto batch = std::make_unique<Batch>(files, n, head_bytes, piece_bytes_);
    queue_all(batch.get(), [&](auto push) {
      for (int i = 0; i < n; ++i) push(Piece{batch.get(), 2 * i, kOpen, 0});
    });
    return batch.release();
  }

  // Wait for every piece of a batch from start_batch or start_files, set each range's (or file's) result and free
  // the batch.
  static void end_batch(Batch* batch) {
    batch->pieces.wait();
    for (int i = 0; i < (int)batch->errors.size(); ++i) {
      const int64_t err = batch->errors[i].load();
      batch->ranges[i].result = err != 0 ? err : batch->ranges[i].nbytes;
    }
    for (int i = 0; batch->files != nullptr && i < (int)batch->left.size(); ++i) {
      const int64_t head = batch->errors[2 * i].load(), body = batch->errors[2 * i + 1].load();
      batch->files[i].result = head != 0 ? head : body;
    }
    delete batch;
  }

 private:
  void run() {
    Staging staging;
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (queue_.empty()) {
          lock.unlock();
          staging.drain();  // nothing else to overlap with: finish the copies in flight
          lock.lock();
          work_.wait(lock, [this] { return !queue_.empty(); });
        }
        job = queue_.front();
        queue_.pop_front();
      }
      if (job.write != nullptr) {
        staging.drain();  // read copies (none in the write pool) finish their pieces now, not after disk I/O
        if (job.publish) {
          complete_file(*job.write, job.file, staging);
        } else {
          write_file(*job.write, job.file, staging);
        }
        job.write->jobs.finish_one();
        continue;
      }
      const Piece piece = job.piece;
      staging.poll();
      if (piece.start == kOpen) {
        open_file(piece.batch, piece.index / 2, staging);
      } else if (piece.start > 0) {  // a piece of a range found in the page cache
        staging.read(piece, piece_bytes_, false);
      } else {
        read_range(piece.batch, piece.index, staging);
      }
    }
  }

  // Read range `index` of `batch`: a host range at once; a GPU range's first piece through staging, and the rest by
  // every idle worker where the page cache held that piece, else by this one.
  void read_range(Batch* batch, int index, Staging& staging) {
    // the batch (and the range) may be gone once its last piece is finished: nothing below reads them after that
    const Range& r = batch->ranges[index];
    const int64_t total = r.nbytes;
    if (total <= 0) {
      batch->finish_piece(index);
    } else if (r.device < 0) {
      const int64_t code = pread_all(r.fd, reinterpret_cast<char*>(r.dst), r.nbytes, r.offset);
      if (code != 0) batch->fail(index, code);
      batch->finish_piece(index);
    } else if (staging.read(Piece{batch, index, 0, std::min(piece_bytes_, total)}, piece_bytes_, true)) {
      std::lock_guard<std::mutex> lock(mutex_);  // in the page cache: the rest goes to every idle worker
      auto at_front = queue_.begin();
      int64_t at = piece_bytes_;
      try {
        for (; at < total; at += piece_bytes_) {
          at_front = queue_.insert(at_front, Piece{batch, index, at, std::min(piece_bytes_, total - at)});
          ++at_front;
        }
      } catch (...) {  // no memory to queue them: the pieces not queued fail the range
        batch->fail(index, -ENOMEM);
        for (; at < total; at += piece_bytes_) batch->finish_piece(index);
      }
      work_.notify_all();
    } else {  // from disk: read by this worker to the end, one sequential stream for the kernel's readahead
      for (int64_t at = piece_bytes_; at < total; at += piece_bytes_) {
        staging.read(Piece{batch, index, at, std::min(piece_bytes_, total - at)}, piece_bytes_, false);
      }
    }
  }

  // File `i` of a batch from start_files: open it, check its size, read its head, then its body (read_range). A file
  // that fails before its body is read finishes all its pieces at once.
  void open_file(Batch* batch, int i, Staging& staging) {
    gio_whole& f = batch->files[i];
    Range &head = batch->own[2 * i], &body = batch->own[2 * i + 1];
    const int fd = open(reinterpret_cast<const char*>(f.path), O_RDONLY | O_CLOEXEC);
    int64_t code = fd < 0 ? -errno : 0;
    struct stat st;
    if (code == 0 && fstat(fd, &st) != 0) code = -errno;
    if (code == 0 && st.st_size > f.size) code = -kSizeChanged;
    f.size = code == 0 || code == -kSizeChanged ? (int64_t)st.st_size : code;
    if (code == 0) {
      head.fd = body.fd = fd;  // closed with its last piece (Batch::close_file)
      const int64_t planned = pieces_of(body, piece_bytes_);
      body.nbytes = std::max<int64_t>(0, st.st_size - head.nbytes);  // a smaller file: fewer pieces than counted
      for (int64_t n = planned - pieces_of(body, piece_bytes_); n > 0; --n) batch->finish_piece(2 * i + 1);
      code = pread_all(fd, reinterpret_cast<char*>(head.dst), head.nbytes, 0);
    } else if (fd >= 0) {
      close(fd);
    }
    if (code != 0) {
      batch->fail(2 * i, code);
      for (int64_t n = batch->left[i].load(); n > 0; --n) batch->finish_piece(2 * i);
      return;
    }
    batch->finish_piece(2 * i);
    read_range(batch, 2 * i + 1, staging);
  }

  // Queue the pieces that `add` pushes, all or none (where memory runs out, none: then it throws).
  template <typename Add>
  void queue_all(Batch* batch, Add add) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      try {
        add([this](const Piece& piece) { queue_.push_back(piece); });
      } catch (...) {  // no worker has seen this batch (the lock is held): take its pieces back
        while (!queue_.empty() && queue_.back().piece.batch == batch) queue_.pop_back();
        throw;
      }
    }
    work_.notify_all();
  }

  // Phase 1 of a file: create it under its temporary name and write its ranges; its first failure in `result`.
  void write_file(WriteBatch& b, int i, Staging& staging) {
    gio_file& f = b.files[i];
    const char* tmp = reinterpret_cast<const char*>(f.tmp);
    int64_t code = 0;
    const int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
      f.result = -errno;
      return;
    }
    b.fds[i] = fd;
    if (b.direct) b.direct_fds[i] = open(tmp, O_WRONLY | O_DIRECT | O_CLOEXEC);  // -1 (page cache) where refused
    for (const gio_wrange* r : b.ranges[i]) {
      code = write_range(*r, fd, b.direct_fds[i], staging);
      if (code != 0) break;
    }
    f.result = code;
    if (b.direct_fds[i] >= 0) close(b.direct_fds[i]);  // one descriptor per file until it is published
    b.direct_fds[i] = -1;
  }

  int64_t write_range(const gio_wrange& r, int fd, int direct_fd, Staging& staging) {
    if (r.device < 0) return pwrite_all(fd, reinterpret_cast<const char*>(r.src), r.nbytes, r.offset);
    return staging.write(r, fd, direct_fd, piece_bytes_);
  }

  // Phase 2 of a file: its later ranges, then fsync (if durable), close, and rename into place; a failed file (or
  // every file of an abandoned batch) is unlinked.
  void complete_file(WriteBatch& b, int i, Staging& staging) {
    int64_t& result = b.files[i].result;
    if (result == 0 && b.abandon) result = -ECANCELED;
    for (const gio_wrange& r : b.later[i]) {
      if (result == 0 && b.fds[i] >= 0) result = write_range(r, b.fds[i], b.direct_fds[i], staging);
    }
    publish_file(b, i);
  }

  static void publish_file(WriteBatch& b, int i) {
    const int fd = b.fds[i], direct_fd = b.direct_fds[i];
    b.fds[i] = b.direct_fds[i] = -1;
    if (fd < 0) return;  // never created: nothing of ours to remove
    const char* tmp = reinterpret_cast<const char*>(b.files[i].tmp);
    int64_t& result = b.files[i].result;
    if (result == 0 && b.durable && fsync(fd) != 0) result = -errno;
    if (direct_fd >= 0) close(direct_fd);
    if (close(fd) != 0 && result == 0) result = -errno;
    if (result == 0 && rename(tmp, reinterpret_cast<const char*>(b.files[i].path)) != 0) result = -errno;
    if (result != 0) unlink(tmp);
  }

 public:
  // Queue phase 1 of `b` (each file created and written); throws where it cannot be queued (then nothing is).
  void start_write(WriteBatch& b) {
    const int n = (int)b.ranges.size();
    b.jobs.reset(n);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      try {
        for (int i = 0; i < n; ++i) queue_.push_back(Job(&b, i, false));
      } catch (...) {  // no worker has seen it (the lock is held): take its jobs back
        drop_jobs(b);
        throw;
      }
    }
    work_.notify_all();
  }

  // Wait for phase 1 of `b`, then run phase 2 (each file's later ranges, sync, close, rename); returns when every
  // file is done.
  void finish_write(WriteBatch& b) {
    b.jobs.wait();
    const int n = (int)b.ranges.size();
    b.jobs.reset(n);
    bool queued = true;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      try {
        // first in the queue: short jobs that their caller waits for, on files already written
        for (int i = n - 1; i >= 0; --i) queue_.push_front(Job(&b, i, true));
      } catch (...) {  // no memory to queue them
        drop_jobs(b);
        queued = false;
      }
    }
    if (!queued) {  // the caller publishes what needs no later range, one by one, outside the pool's lock
      for (int i = 0; i < n; ++i) {
        if (!b.later[i].empty() && b.files[i].result == 0) b.files[i].result = -ENOMEM;
        if (b.abandon && b.files[i].result == 0) b.files[i].result = -ECANCELED;
        publish_file(b, i);
      }
      return;
    }
    work_.notify_all();
    b.jobs.wait();
  }

 private:
  void drop_jobs(WriteBatch& b) {
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const Job& job) { return job.write == &b; }),
                 queue_.end());
  }

  const int64_t piece_bytes_;
  std::mutex mutex_;
  std::condition_variable work_;
  std::deque<Job> queue_;
  int started_ = 0;
};

using Pools = std::unordered_map<int64_t, std::unique_ptr<Pool>>;  // by piece size
std::mutex pools_mutex;
Pools* pools[2] = {nullptr, nullptr};  // reads', writes': a read never waits for a worker busy with a store's files
// The lock is held across fork(), so a child never inherits it taken by a thread that does not exist there; the
// child drops its parent's pools (their workers did not come along) without touching them.
const int fork_guard = pthread_atfork([] { pools_mutex.lock(); }, [] { pools_mutex.unlock(); }, [] {
  pools[0] = pools[1] = nullptr;
  pools_mutex.unlock();
});

Pool* pool_for(int64_t piece_bytes, int threads, bool writes) {
  std::lock_guard<std::mutex> lock(pools_mutex);
  Pools*& kind = pools[writes ? 1 : 0];
  if (kind == nullptr) kind = new Pools();
  auto& pool = (*kind)[piece_bytes];
  if (!pool) pool.reset(new Pool(piece_bytes));
  return pool->grow(threads) ? pool.get() : nullptr;
}

bool valid_wranges(const gio_wrange* ranges, int nranges, int nfiles) {
  for (int i = 0; i < nranges; ++i) {
    const gio_wrange& r = ranges[i];
    if (r.file < 0 || r.file >= nfiles || r.nbytes < 0 || r.offset < 0 || (r.nbytes > 0 && r.src == 0)) return false;
  }
  return true;
}

// The end of gio_read_begin and gio_read_files_begin: where the arguments are `valid` and there is anything to read,
// `start` queues the batch on the read pool; null with *error set otherwise (see gio_read_begin).
template <typename Start>
void* start_reads(bool valid, int n, int threads, int64_t piece_bytes, int* error, Start start) {
  *error = -EINVAL;
  if (!valid || threads < 1 || piece_bytes < 4096 || piece_bytes % 4096 != 0) return nullptr;
  *error = 0;
  if (n == 0) return nullptr;
  try {
    Pool* pool = pool_for(piece_bytes, threads, false);
    if (pool == nullptr) {
      *error = -EAGAIN;
      return nullptr;
    }
    return start(pool);
  } catch (const std::exception&) {
    *error = -ENOMEM;
    return nullptr;
  }
}

}  // namespace

extern "C" {
// The SHA-256 of this file as CMake read it (CMakeLists.txt), or "" when built some other way.
#ifndef GDSCACHE_SOURCE_SHA256
#define GDSCACHE_SOURCE_SHA256 ""
#endif
const char* gdscache_source_sha256() { return GDSCACHE_SOURCE_SHA256; }

int gio_range_size() { return (int)sizeof(Range); }

// Start reading every range of `ranges[0, n)` in pieces of at most `piece_bytes` (a multiple of 4096) on the
// process's read pool for that piece size, grown to `threads` workers if smaller (it never shrinks; each worker keeps
// 2 x piece_bytes of pinned staging), and return at once a batch that gio_read_finish must be given, exactly once;
// until it returns, `ranges` and every destination stay valid and untouched. Null with *error = 0 for an empty batch
// (nothing to finish), or with -EINVAL for bad arguments, -EAGAIN where no worker thread can start, -ENOMEM where
// the batch cannot be queued (then nothing was read).
void* gio_read_begin(Range* ranges, int n, int threads, int64_t piece_bytes, int* error) {
  bool valid = n >= 0;
  for (int i = 0; valid && i < n; ++i) {
    valid = ranges[i].nbytes >= 0 && ranges[i].offset >= 0 && (ranges[i].nbytes == 0 || ranges[i].dst != 0);
  }
  return start_reads(valid, n, threads, piece_bytes, error, [&](Pool* pool) { return pool->start_batch(ranges, n); });
}

// Wait until every range of a gio_read_begin batch (or every file of a gio_read_files_begin batch) has landed or
// failed, set their results and free the batch. 0. In a process forked after the batch began, it is the parent's:
// nothing is waited for, results -ECANCELED. The child closes no descriptor: a number the parent's workers had
// closed before the fork may name another file in the child by now (copies of those still open close at exec).
int gio_read_finish(void* handle) {
  Batch* batch = static_cast<Batch*>(handle);
  if (batch->pid != getpid()) {
    for (int i = 0; i < (int)batch->errors.size(); ++i) batch->ranges[i].result = -ECANCELED;
    for (int i = 0; batch->files != nullptr && i < (int)batch->left.size(); ++i) batch->files[i].result = -ECANCELED;
    delete batch;
    return 0;
  }
  Pool::end_batch(batch);
  return 0;
}

int gio_whole_size() { return (int)sizeof(gio_whole); }

// Start reading the `n` files of `files` whole, each on its own: a worker opens it, checks that it has at most
// `size` bytes (else it is not read: -kSizeChanged), reads its first `head_bytes` to `head` (host memory; a file
// shorter than that fails -kShortFile) and the rest to `body` (on `device`) in pieces of at most `piece_bytes`, then
// closes it (touched where asked, if read whole); `size` comes back as the size it has. Returns at once a batch for
// gio_read_finish, which must be called exactly once; until it returns, `files`, their paths and destinations stay
// valid and untouched. Each file's `result`: 0, or its first failure. Null with *error as gio_read_begin sets it.
void* gio_read_files_begin(gio_whole* files, int n, int64_t head_bytes, int threads, int64_t piece_bytes,
                           int* error) {
  bool valid = n >= 0 && head_bytes >= 0;
  for (int i = 0; valid && i < n; ++i) {
    const gio_whole& f = files[i];
    valid = f.path != 0 && f.size >= 0 && (head_bytes == 0 || f.head != 0) && (f.size <= head_bytes || f.body != 0);
  }
  return start_reads(valid, n, threads, piece_bytes, error,
                     [&](Pool* pool) { return pool->start_files(files, n, head_bytes); });
}

int gio_file_size() { return (int)sizeof(gio_file); }

int gio_wrange_size() { return (int)sizeof(gio_wrange); }

// Start writing the files `files[0, nfiles)`: each is created at `tmp` (which must not exist) and gets the ranges of
// `ranges[0, nranges)` that name it, in the order given. GPU ranges go through the write pool's pinned staging in pieces of
// `piece_bytes`, through O_DIRECT where `direct` and aligned. Returns at once a batch for gio_write_finish, which
// must be called exactly once; until it returns, `files`, `ranges` and every source stay valid and unchanged. Null
// with *error = -EINVAL for bad arguments, -EAGAIN where no worker can start, -ENOMEM where the batch cannot be
// queued (then nothing was created).
void* gio_write_begin(gio_file* files, int nfiles, const gio_wrange* ranges, int nranges, int threads,
                      int64_t piece_bytes, int durable, int direct, int* error) {
  *error = -EINVAL;
  if (nfiles < 0 || nranges < 0 || threads < 1 || piece_bytes < 4096 || piece_bytes % 4096 != 0) return nullptr;
  for (int i = 0; i < nfiles; ++i) {
    if (files[i].tmp == 0 || files[i].path == 0) return nullptr;
  }
  if (!valid_wranges(ranges, nranges, nfiles)) return nullptr;
  WriteBatch* batch = nullptr;
  try {
    batch = new WriteBatch(files, nfiles, ranges, nranges, durable != 0, direct != 0);
    batch->pool = pool_for(piece_bytes, threads, true);
    if (batch->pool == nullptr) {
      delete batch;
      *error = -EAGAIN;
      return nullptr;
    }
    batch->pool->start_write(*batch);
  } catch (const std::exception&) {
    delete batch;
    *error = -ENOMEM;
    return nullptr;
  }
  *error = 0;
  return batch;
}

// Finish a batch of gio_write_begin: once its files are written, write `ranges[0, nranges)` (each names its file,
// as in gio_write_begin; the caller keeps them valid until this returns), then publish each file: fsynced where
// durable, closed and renamed to `path`; with `abandon`, every file is unlinked instead (result -ECANCELED). Each
// file's `result` is 0 or its first failure (then its temporary file is gone). Frees the batch. 0, or -EINVAL for
// bad ranges, or -ENOMEM where the later ranges cannot be kept (in both cases the batch is abandoned). In a process
// forked after gio_write_begin, only the child's copies of the descriptors are closed (results -ECANCELED): the
// files are the parent's to publish.
int gio_write_finish(void* handle, const gio_wrange* ranges, int nranges, int abandon) {
  WriteBatch* batch = static_cast<WriteBatch*>(handle);
  const int nfiles = (int)batch->ranges.size();
  if (batch->pid != getpid()) {  // begun before a fork: the parent finishes it; the child only lets go of it
    for (int i = 0; i < nfiles; ++i) {
      if (batch->fds[i] >= 0) close(batch->fds[i]);
      if (batch->direct_fds[i] >= 0) close(batch->direct_fds[i]);
      batch->files[i].result = -ECANCELED;
    }
    delete batch;
    return 0;
  }
  int code = 0;
  if (nranges < 0 || !valid_wranges(ranges, nranges, nfiles)) {
    code = -EINVAL;
    abandon = 1;
  }
  batch->abandon = abandon != 0;
  for (int i = 0; code == 0 && !batch->abandon && i < nranges; ++i) {
    try {
      batch->later[ranges[i].file].push_back(ranges[i]);
    } catch (const std::exception&) {
      code = -ENOMEM;
      batch->abandon = true;
    }
  }
  batch->pool->finish_write(*batch);
  delete batch;
  return code;
}

const char* gio_cuda_error_name(int err) { return cudaGetErrorName((cudaError_t)err); }

}  // extern "C"
