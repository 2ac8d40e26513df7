from minhub.cli import main

raise SystemExit(main())
