"""Studies built on the engine: ``python -m calibrate.studies.leave_tenant_out`` (the
consistency study of docs/CONSISTENCY.md), its result types (``outcomes``) and its
report (``consistency_report``)."""
