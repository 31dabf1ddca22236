"""The services behind `kifmerge.api`, one module per concern. Each opens the registry,
validates, works outside any transaction, then records its result in one transaction."""
