from tracker_cli.main import main

raise SystemExit(main())
