//! Connection wrappers (`conn_limit::Limited`, `idle::Idle`) change only
//! how a connection is read: these macros give each the connection's own
//! writing and tonic's connect info.

/// Implements `AsyncWrite` for a connection wrapper (a struct with the
/// connection in its `inner` field) by delegating to the connection.
macro_rules! delegate_write {
    ($wrapper:ident) => {
        impl<S: ::tokio::io::AsyncWrite + Unpin> ::tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use delegate_write;

/// Implements `AsyncWrite` and tonic's `Connected` for a connection
/// wrapper (a struct with the connection in its `inner` field) by
/// delegating both to the connection: the wrappers only change reading.
macro_rules! delegate_write_and_connect_info {
    ($wrapper:ident) => {
        $crate::wrap_io::delegate_write!($wrapper);

        impl<S: ::tonic::transport::server::Connected> ::tonic::transport::server::Connected
            for $wrapper<S>
        {
            type ConnectInfo = S::ConnectInfo;

            fn connect_info(&self) -> Self::ConnectInfo {
                self.inner.connect_info()
            }
        }
    };
}
pub(crate) use delegate_write_and_connect_info;
