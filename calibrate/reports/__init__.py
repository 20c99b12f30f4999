"""What a calibration run prints and writes: the table (``report``), the plots
(``plots``) and the files of a run (``outputs``: document, report.md, PNGs)."""
