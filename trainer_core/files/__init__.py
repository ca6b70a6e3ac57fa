"""Files the pack opens or writes: paths confined to allowed folders."""
