"""Phase 2, selection (``paser select``): the stages in order (embedding, manifold, clusters, token
counts, degradation, allocation, ranking and the concept filter; or strat and adaptive), the run
folder they write, scoring across engines, the settings of a run and its report. Imports data,
models and what every phase uses; nothing from recovery or evaluation."""
