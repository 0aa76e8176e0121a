from vit_spine.cli import main

raise SystemExit(main())
