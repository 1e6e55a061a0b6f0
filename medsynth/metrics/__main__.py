"""``python -m medsynth.metrics SAMPLES_DIR [--features NET.pt --real-dir REAL]``: score a folder of generated
volumes (diversity, 2.5D FID) without a judge; see :func:`medsynth.callbacks.report.main`."""

from medsynth.callbacks.report import main

raise SystemExit(main())
