"""The judge layer: every rule that turns measurements into verdicts, for every probe and path.

Probes measure; the judge decides. The same functions run at the end of a live run, when a stored
run is reloaded and when sweep shards are ingested, so a verdict never depends on the path.
- blame: who is `wrong` (evidence against a device's own computation; votes need a strict
  majority; unresolved groups are `suspect`);
- speed: who is `slow` (noise-aware suspects, confirmed by an interleaved retest), against peers,
  against per-SKU baselines and against a device's own history;
- throttle: a burn whose throughput fell is `slow` on the driver's word (NVML reasons) or when
  the speed retest confirms it, never on its own timeline alone.
"""
