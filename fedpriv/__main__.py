from fedpriv.cli import main
import sys
sys.exit(main())
