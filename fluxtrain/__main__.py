from fluxtrain.cli import main

raise SystemExit(main())
