"""What the monitor shows, drawn with its optional extra (`pip install 'forge_rt[monitor]'`): the live
panel and the peak table in a terminal (`panel`, rich) and the picture of a record (`plot`, matplotlib)."""
