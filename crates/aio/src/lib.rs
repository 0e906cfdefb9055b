//! aio
