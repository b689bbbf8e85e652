"""Load balancing by migration among a set of replicas, Llumnix's default policy (AlibabaPAI/llumnix),
shared by the llumnix baseline (over all replicas) and the cascade (within each stage).

A replica's freeness is its free pages after the waiting requests' demand, per request (Llumnix's
"remaining steps"). Each tick the least free replicas are paired with the freest ones, outside in,
while a pair's freeness gap exceeds ``gap_pages``; the source's shortest running request moves when
that narrows the gap without reversing it (no ping-pong). A replica takes part in one move at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from jaxinfer.router.base import Migration, ReplicaLoad, RequestLoad


def freeness(r: ReplicaLoad) -> float:
    """Llumnix's remaining-steps load metric, in pages per request; higher is freer."""
    free = r.kv_pages_total - r.kv_pages_used - r.waiting_pages
    return free / max(len(r.requests), 1)


def balance_moves(replicas: Sequence[ReplicaLoad], gap_pages: float,
                  skip: Collection[str] = ()) -> list[Migration]:
    """The balance orders among ``replicas`` (the caller passes only those free to take part: accepting,
    no move in flight); requests in ``skip`` stay where they are."""
    order = sorted(replicas, key=lambda r: (freeness(r), r.replica))
    orders = []
    lo, hi = 0, len(order) - 1  # lo: least free (source), hi: freest (destination)
    while lo < hi:
        src, dst = order[lo], order[hi]
        if freeness(dst) - freeness(src) <= gap_pages:
            break
        running = [q for q in src.requests if q.running and not q.migrating and q.request_id not in skip]
        if running:
            req = min(running, key=lambda q: (q.context_len, q.request_id))
            if _improves(src, dst, req):
                orders.append(Migration(req.request_id, src.replica, dst.replica, "balance"))
        lo, hi = lo + 1, hi - 1
    return orders


def _improves(src: ReplicaLoad, dst: ReplicaLoad, req: RequestLoad) -> bool:
    """After the move the destination is still the freer one, by less than before."""
    pages = -(-req.context_len // src.page_size)
    free_src = (src.kv_pages_total - src.kv_pages_used - src.waiting_pages + pages) / max(len(src.requests) - 1, 1)
    free_dst = (dst.kv_pages_total - dst.kv_pages_used - dst.waiting_pages - pages) / (len(dst.requests) + 1)
    return 0 <= free_dst - free_src < freeness(dst) - freeness(src)
