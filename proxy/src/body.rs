//! Body wrappers: [`Counted`] counts the bytes that pass; [`Finish`] also runs a callback
//! once when the body ends, fails, or is dropped early (the client went away) — where a
//! request's metrics and access-log line are recorded, after the last byte.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::{BoxBody, BoxError};

/// Counts data bytes into a shared counter.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &r
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Done = Box<dyn FnOnce(u64, Option<String>) + Send + Sync>;

/// Runs `done(bytes sent, grpc-status from trailers)` exactly once.
pub struct Finish {
    inner: BoxBody,
    sent: u64,
    grpc_status: Option<String>,
    done: Option<Done>,
}

impl std::fmt::Debug for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finish").field("sent", &self.sent).finish()
    }
}

impl Finish {
    pub fn new(inner: BoxBody, done: impl FnOnce(u64, Option<String>) + Send + Sync + 'static) -> Self {
        Finish { inner, sent: 0, grpc_status: None, done: Some(Box::new(done)) }
    }

    fn fire(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.sent, self.grpc_status.take());
        }
    }
}

impl Body for Finish {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    self.grpc_status = t.get("grpc-status").and_then(|v| v.to_str().ok()).map(String::from);
                }
                if self.inner.is_end_stream() {
                    self.fire();
                }
            }
            Some(Err(_)) | None => self.fire(),
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.fire();
    }
}
