"""The papers' findings reproduced: each script writes its report to bench/repro/reports/."""
