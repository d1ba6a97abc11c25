"""`mtfm compare`: every model on the same data, budget and tuning effort (paper Table 2).

The question a user asks first: "does MTFM beat what I run today, on my data?" This package
answers it with one command:

* :mod:`mtfm.compare.runner` trains every model (MTFM, the LR floor, the seven neural
  baselines of :mod:`mtfm.baselines`, LightGBM) the same way: the same epochs and early
  stopping, a learning-rate sweep on the validation split over the same grid of factors of each
  model's preset lr (the only tuning any model gets; everything else is its paper's defaults),
  then the chosen lr for every seed, evaluated on the test split;
* :mod:`mtfm.compare.table` turns the runs into the Table-2-style markdown table (AUC and GAUC
  per scenario x task, mean +- std over seeds, best in bold, second underlined, cells with too
  few test positives marked) and the paired "is MTFM best beyond seed noise" verdicts.
"""
