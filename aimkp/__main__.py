from aimkp.cli import main

raise SystemExit(main())
