"""Scale-out on Ray: the driver plans once, whole prefix groups go to engine actors."""
