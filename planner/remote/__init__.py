"""Remote: the SSH transport, the job bundle, safe extraction of pulled artifacts."""
