from vqfast.cli import main

raise SystemExit(main())
