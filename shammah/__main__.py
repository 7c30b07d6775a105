from shammah.cli import main

raise SystemExit(main())
