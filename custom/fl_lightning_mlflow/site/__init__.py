"""Site side: the FLARE executor, training engines, Lightning logger and data."""
