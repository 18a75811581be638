"""The concurrency engine beneath the stores: knows anyio, asyncio and threads, nothing of Zarr.

- `loops`: which event loop a task runs on, waking a waiter on its own loop, waiting out a
  result through native asyncio double cancellation;
- `limit` and `adaptive`: the loop-agnostic `Limiter` (one bound across every loop and thread)
  and the `AdaptiveLimiter` whose window follows a server's throttling;
- `threads`: worker threads, the hop batching for short blocking calls;
- `bridge`: coroutines of asyncio-only libraries run on one asyncio loop of ours, cancellable
  from any caller;
- `store_calls`: the calls in flight on one store, so that closing it waits for them;
- `api_scope`: what one call of `zarr_anyio.api` has running, so that it ends with the call;
- `errors`: one error, never an ``ExceptionGroup``, out of a task group;
- `fork`: what a forked child starts afresh (worker pool, bridge loop, limiter tokens, locks);
- `extras`: which optional package each part needs, and the one line naming the extra to install.
"""
