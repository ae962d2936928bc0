//! Zero-copy sending of large files: io_uring `splice` moves page-cache
//! pages of the file into a pipe and from the pipe into the sync socket, so
//! the content never passes through user space (the plain path reads each
//! chunk into a buffer, copies it into a frame and copies it again into the
//! socket). Each chunk goes out as one `Bulk` frame (`crate::wire`): its
//! header is sent from a small buffer, its payload is spliced.
//!
//! The pump runs on a thread of its own with its own ring, because the
//! event loop's runtime (tokio-uring) has no splice operation; splices into
//! a socket run on io_uring's worker threads anyway. Per chunk the thread
//! submits one linked chain — file → pipe, header → socket, pipe → socket —
//! and waits for it. A file that shrinks while it is sent is padded with
//! zeros to the announced size, so the stream stays in step; the receiver's
//! content hash then refuses it and the sender sends the new version.
//!
//! mmap + `send_zc` was not used: a file truncated while mapped raises
//! SIGBUS in the daemon, and a splice cannot fault.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, Shutdown};
use rustix::pipe::SpliceFlags;

/// How the caller frames each chunk on the socket (its wire format: the io
/// layer does not speak it; `link::bulk_framing` gives hasync's).
#[derive(Clone, Copy)]
pub struct ChunkFraming {
    /// Largest chunk payload.
    pub max_chunk: u32,
    /// Bytes of the header sent before each chunk.
    pub header_len: usize,
    /// Writes the header of a chunk of `len` bytes into `out`
    /// (`header_len` bytes).
    pub header: fn(len: u32, out: &mut [u8]),
}

/// Padding for a file that shrank while it was sent.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

const SPLICE_F_MOVE: u32 = SpliceFlags::MOVE.bits();
const SPLICE_F_NONBLOCK: u32 = SpliceFlags::NONBLOCK.bits();
const SPLICE_F_MORE: u32 = SpliceFlags::MORE.bits();
const MSG_MORE: i32 = SendFlags::MORE.bits() as i32;
/// The MSG_WAITALL bit (rustix files it under receive flags); io_uring's
/// send honours it too.
const MSG_WAITALL: i32 = RecvFlags::WAITALL.bits() as i32;
const EINVAL: i32 = Errno::INVAL.raw_os_error();
const EOPNOTSUPP: i32 = Errno::OPNOTSUPP.raw_os_error();
const ECANCELED: i32 = Errno::CANCELED.raw_os_error();
const EAGAIN: i32 = Errno::AGAIN.raw_os_error();
const EINTR: i32 = Errno::INTR.raw_os_error();

/// What sending one file took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// `Bulk` frames sent.
    pub frames: u64,
    /// Zero bytes sent in place of content the file lost while it was sent.
    pub padded: u64,
}

struct Job {
    file: OwnedFd,
    len: u64,
    done: tokio::sync::oneshot::Sender<io::Result<Spliced>>,
}

/// Sends whole files as `Bulk` frames into one socket. Dropping the pump
/// while a file is going out shuts the socket down, which ends that send:
/// the pump belongs to one sync session.
pub struct SplicePump {
    jobs: Option<crossbeam_channel::Sender<Job>>,
    sock: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    chunk: u32,
}

impl SplicePump {
    /// A pump writing into `sock` (its descriptor is duplicated). Nothing
    /// else may write to the socket while a [`SplicePump::send`] runs.
    pub fn new(sock: &impl AsRawFd, framing: ChunkFraming) -> io::Result<SplicePump> {
        let sock = Arc::new(super::dup_fd(sock)?);
        let (pipe_r, pipe_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        // A chunk must fit the pipe: the pump is its only reader.
        let size = rustix::pipe::fcntl_setpipe_size(&pipe_w, framing.max_chunk as usize)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&pipe_w))?;
        let chunk = (size.min(framing.max_chunk as usize) & !4095) as u32;
        if chunk == 0 {
            return Err(io::Error::other(format!(
                "pipe of {size} bytes is too small"
            )));
        }
        let ring = IoUring::new(8)?;
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let pump = Pump {
            ring,
            pipe_r,
            pipe_w,
            sock: sock.clone(),
            chunk,
            header: vec![0; framing.header_len].into_boxed_slice(),
            framing,
            ring_failed: false,
        };
        let thread = std::thread::Builder::new()
            .name("hasync-splice".into())
            .spawn(move || pump.serve(rx))?;
        Ok(SplicePump {
            jobs: Some(tx),
            sock,
            thread: Some(thread),
            chunk,
        })
    }

    /// Payload bytes per `Bulk` frame.
    pub fn chunk(&self) -> u32 {
        self.chunk
    }

    /// Sends the first `len` bytes of `file` as `Bulk` frames of
    /// [`SplicePump::chunk`] bytes (the last one shorter). An error leaves
    /// the stream out of step: the caller must drop the connection.
    pub async fn send(&self, file: OwnedFd, len: u64) -> io::Result<Spliced> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let jobs = self.jobs.as_ref().expect("pump is running");
        jobs.send(Job { file, len, done })
            .map_err(|_| io::Error::other("splice thread is gone"))?;
        wait.await
            .unwrap_or_else(|_| Err(io::Error::other("splice thread ended mid-send")))
    }
}

impl Drop for SplicePump {
    fn drop(&mut self) {
        self.jobs = None;
        // Ends a send in progress (its splice into the socket fails) and
        // tells the peer the session is over.
        // Not joined: a file splice stuck on hung storage must not stop
        // the event loop; the thread ends once its send fails or finishes.
        let _ = rustix::net::shutdown(&*self.sock, Shutdown::Both);
        self.thread = None;
    }
}

/// The pump thread's state.
struct Pump {
    ring: IoUring,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    sock: Arc<OwnedFd>,
    chunk: u32,
    /// The current chunk's header, on the heap so that it can be leaked if
    /// the ring fails with ops possibly still reading it.
    header: Box<[u8]>,
    framing: ChunkFraming,
    /// A submission failed: ops may still be pending in the kernel.
    ring_failed: bool,
}

/// One completion's result: bytes, or the errno.
type Res = Result<u32, i32>;

impl Pump {
    fn serve(mut self, jobs: crossbeam_channel::Receiver<Job>) {
        for Job { file, len, done } in jobs {
            let res = self.send_file(file.as_raw_fd(), len);
            let outcome = match &res {
                Ok(_) => None,
                Err(e) => Some(e.kind()),
            };
            let _ = done.send(res);
            if self.ring_failed {
                // Ops of a failed submission may still be pending: leak
                // everything they name (header, pipe, socket, ring, file)
                // rather than free or close it under the kernel.
                std::mem::forget(file);
                std::mem::forget(self);
                return;
            }
            match outcome {
                // Nothing went out: the stream is in step, the sender
                // sends this file (and the next) another way.
                None | Some(io::ErrorKind::Unsupported) => {}
                // The stream is out of step; the session drops the socket.
                Some(_) => return,
            }
        }
    }

    fn send_file(&mut self, file: RawFd, len: u64) -> io::Result<Spliced> {
        let mut out = Spliced::default();
        let mut pos = 0u64;
        while pos < len {
            let want = (len - pos).min(u64::from(self.chunk)) as u32;
            out.padded += self.send_chunk(file, pos, want, pos + u64::from(want) < len)?;
            out.frames += 1;
            pos += u64::from(want);
        }
        Ok(out)
    }

    /// One `Bulk` frame of `want` bytes from `file` at `pos`; returns the
    /// zero bytes sent in place of missing content.
    fn send_chunk(&mut self, file: RawFd, pos: u64, want: u32, more: bool) -> io::Result<u64> {
        (self.framing.header)(want, &mut self.header);
        let header_len = self.header.len();
        let hdr = self.header.as_ptr();
        let pipe_r = self.pipe_r.as_raw_fd();
        let pipe_w = self.pipe_w.as_raw_fd();
        let sock = self.sock.as_raw_fd();
        let tail = if more { SPLICE_F_MORE } else { 0 };
        let chain = [
            opcode::Splice::new(types::Fd(file), pos as i64, types::Fd(pipe_w), -1, want)
                .flags(SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                .build()
                .flags(squeue::Flags::IO_LINK),
            // MSG_WAITALL: a short header send must fail the chain rather
            // than let the payload follow it (without it, any count counts).
            opcode::Send::new(types::Fd(sock), hdr, header_len as u32)
                .flags(MSG_MORE | MSG_WAITALL)
                .build()
                .flags(squeue::Flags::IO_LINK),
            opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(sock), -1, want)
                .flags(SPLICE_F_MOVE | tail)
                .build(),
        ];
        let [r_in, r_hdr, r_out] = self.run(&chain)?;
        // The usual case is done here; the rest handles short transfers.
        let mut in_pipe = match r_in {
            Ok(n) => n,
            Err(EAGAIN) => 0,
            // A filesystem without splice, before anything went out.
            Err(e @ (EINVAL | EOPNOTSUPP)) if pos == 0 && r_hdr == Err(ECANCELED) => {
                let err = errno(e, "splice from the file");
                return Err(io::Error::new(io::ErrorKind::Unsupported, err));
            }
            Err(e) => return Err(errno(e, "splice from the file")),
        };
        let mut hdr_sent = match r_hdr {
            Ok(n) => n as usize,
            Err(ECANCELED) => 0,
            Err(e) => return Err(errno(e, "send of a bulk header")),
        };
        let mut sent = match r_out {
            Ok(n) => n,
            Err(ECANCELED) => 0,
            Err(e) => return Err(errno(e, "splice into the socket")),
        };
        if hdr_sent < header_len && sent > 0 {
            return Err(io::Error::other("bulk payload went out before its header"));
        }
        while hdr_sent < header_len {
            let rest = self.header[hdr_sent..].as_ptr();
            let op = opcode::Send::new(types::Fd(sock), rest, (header_len - hdr_sent) as u32)
                .flags(MSG_MORE)
                .build();
            match self.run(&[op])?[0] {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => hdr_sent += n as usize,
                Err(e) => return Err(errno(e, "send of a bulk header")),
            }
        }
        let mut padded = 0u64;
        loop {
            while sent < in_pipe {
                let op =
                    opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(sock), -1, in_pipe - sent)
                        .flags(SPLICE_F_MOVE | tail)
                        .build();
                match self.run(&[op])?[0] {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => sent += n,
                    Err(e) => return Err(errno(e, "splice into the socket")),
                }
            }
            if in_pipe == want {
                return Ok(padded);
            }
            // The pipe is empty, so a non-blocking splice fills it as far
            // as it can instead of waiting for room only we could make.
            let op = opcode::Splice::new(
                types::Fd(file),
                (pos + u64::from(in_pipe)) as i64,
                types::Fd(pipe_w),
                -1,
                want - in_pipe,
            )
            .flags(SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            .build();
            match self.run(&[op])?[0] {
                Ok(0) => {
                    // The file shrank: keep the announced size.
                    let missing = want - in_pipe;
                    self.send_zeros(missing as usize)?;
                    padded += u64::from(missing);
                    return Ok(padded);
                }
                Ok(n) => in_pipe += n,
                Err(e) => return Err(errno(e, "splice from the file")),
            }
        }
    }

    fn send_zeros(&mut self, mut n: usize) -> io::Result<()> {
        let sock = self.sock.as_raw_fd();
        while n > 0 {
            let k = n.min(ZEROS.len());
            let op = opcode::Send::new(types::Fd(sock), ZEROS.as_ptr(), k as u32).build();
            match self.run(&[op])?[0] {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => n -= m as usize,
                Err(e) => return Err(errno(e, "send of padding")),
            }
        }
        Ok(())
    }

    /// Submits `ops` (a chain or one op), waits for all of them, and returns
    /// their results in order.
    ///
    /// Every buffer and descriptor an op names outlives it: the header is
    /// `self.header` (rewritten only between chains), padding is the static
    /// `ZEROS`, and on success this returns only after the kernel completed
    /// all `N` ops. If a submission fails, `ring_failed` makes `serve` leak
    /// the header, pipe, socket, ring and file instead of freeing or closing
    /// them (a linked op looks its descriptor up only when it runs, so a
    /// closed and reused number would be another file).
    fn run<const N: usize>(&mut self, ops: &[squeue::Entry; N]) -> io::Result<[Res; N]> {
        for (i, op) in ops.iter().enumerate() {
            let op = op.clone().user_data(i as u64);
            // SAFETY: what `op` names outlives it (see this function's doc).
            unsafe {
                self.ring.submission().push(&op).map_err(|_| {
                    self.ring_failed = true;
                    io::Error::other("splice ring is full")
                })?;
            }
        }
        let mut res = [Err(ECANCELED); N];
        let mut seen = 0;
        while seen < N {
            match self.ring.submit_and_wait(N - seen) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(EINTR) => continue,
                Err(e) => {
                    self.ring_failed = true;
                    return Err(e);
                }
            }
            for cqe in self.ring.completion() {
                let r = cqe.result();
                res[cqe.user_data() as usize] = if r < 0 { Err(-r) } else { Ok(r as u32) };
                seen += 1;
            }
        }
        Ok(res)
    }
}

fn errno(e: i32, what: &str) -> io::Error {
    let err = io::Error::from_raw_os_error(e);
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use crate::link::bulk_framing;
    use crate::wire::{decode_frame, Kind, BULK_PAYLOAD_BYTES_MAX};

    /// Reads the peer side until `n` frames are decoded; returns their
    /// concatenated payloads and the bytes read after them.
    fn read_frames(mut peer: TcpStream, n: u64) -> (Vec<u8>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut frames = 0;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            while frames < n {
                let Some((f, used)) = decode_frame(&buf).unwrap() else {
                    break;
                };
                assert_eq!(f.kind, Kind::Bulk);
                out.extend_from_slice(&f.payload);
                buf.drain(..used);
                frames += 1;
            }
            if frames == n {
                return (out, buf);
            }
            let k = peer.read(&mut chunk).unwrap();
            assert!(k > 0, "pump closed the socket after {frames} frames");
            buf.extend_from_slice(&chunk[..k]);
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn sends_a_file_as_bulk_frames_then_ordinary_writes_follow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data = content(2 * BULK_PAYLOAD_BYTES_MAX as usize + 12_345);
        std::fs::write(&path, &data).unwrap();
        let (mut a, b) = pair();
        let pump = SplicePump::new(&a, bulk_framing()).unwrap();
        let frames = data.len().div_ceil(pump.chunk() as usize) as u64;
        let reader = std::thread::spawn(move || {
            let (payload, mut tail) = read_frames(b.try_clone().unwrap(), frames);
            let mut rest = vec![0u8; 5 - tail.len()];
            (&b).read_exact(&mut rest).unwrap();
            tail.extend_from_slice(&rest);
            (payload, tail)
        });
        let file = std::fs::File::open(&path).unwrap();
        let sent = tokio_uring::start(pump.send(file.into(), data.len() as u64)).unwrap();
        assert_eq!(sent, Spliced { frames, padded: 0 });
        // The socket is still usable by its owner afterwards.
        a.write_all(b"after").unwrap();
        let (payload, tail) = reader.join().unwrap();
        assert!(payload == data, "spliced content differs");
        assert_eq!(&tail, b"after");
    }

    #[test]
    fn a_file_shorter_than_announced_is_padded_to_keep_the_stream_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrunk");
        let data = content(300_000);
        std::fs::write(&path, &data).unwrap();
        let (a, b) = pair();
        let pump = SplicePump::new(&a, bulk_framing()).unwrap();
        let announced = BULK_PAYLOAD_BYTES_MAX as u64 + 50_000;
        let frames = announced.div_ceil(u64::from(pump.chunk()));
        let reader = std::thread::spawn(move || {
            let (payload, rest) = read_frames(b, frames);
            assert!(
                rest.is_empty(),
                "{} stray bytes after the frames",
                rest.len()
            );
            payload
        });
        let file = std::fs::File::open(&path).unwrap();
        let sent = tokio_uring::start(pump.send(file.into(), announced)).unwrap();
        assert_eq!(sent.padded, announced - data.len() as u64);
        let payload = reader.join().unwrap();
        assert_eq!(payload.len() as u64, announced);
        assert!(payload[..data.len()] == data[..]);
        assert!(payload[data.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn dropping_the_pump_ends_a_send_the_peer_never_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, content(64 << 20)).unwrap();
        let (a, b) = pair();
        let pump = SplicePump::new(&a, bulk_framing()).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let res = tokio_uring::start(async {
            tokio::select! {
                r = pump.send(file.into(), 64 << 20) => Some(r),
                _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => None,
            }
        });
        assert!(
            res.is_none(),
            "64 MiB went into a socket nobody reads: {res:?}"
        );
        let t = std::time::Instant::now();
        drop(pump);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // The connection is shut down: the peer sees the end after the bytes.
        let mut sink = Vec::new();
        (&b).read_to_end(&mut sink).unwrap();
        assert!(sink.len() < 64 << 20);
        drop(a);
    }
}
