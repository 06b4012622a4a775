"""Reading a trained crosscoder: the paper's feature-evolution analyses (docs/ANALYSIS.md).

The pipeline, one module each:
    run_files    a run folder -> crosscoder, config, metrics, dataset, snapshot steps, tokenizer, loss curve
    activations  one pass over cached tokens -> firing counts, per-snapshot EV / L0, top contexts
    evolution    decoder norms (+ firing) -> the per-feature table (features.parquet) and projections
    synthetic_check  the table against a data.synthetic truth, in the table's unit (synthetic_check.json)
    summary      table + pass -> summary.json (everything the figures show)
    figures      summary.json + features table -> PNG figures (+ TensorBoard images)
    browser      top contexts of chosen features, decoded with the suite's tokenizer
    report       one self-contained report.html (figures embedded, readable offline)
    sweep        a multirun folder -> EV vs L0 frontier, crosscoders against single-snapshot SAEs
    tasks        prompt pairs and logit-difference metrics for attribution (induction, ioi, sva)
    splice       the crosscoder written into a snapshot model at its hook (reconstruction + error term)
    attribution  a task's metric attributed to features at every snapshot, and the causal check
    attribution_summary  attribution.json (and its CSV, NPZ, TensorBoard scalars) from those results
    attribution_figure  figure 7: the metric over snapshots beside the features that carry it
analyze.py composes them.
"""
