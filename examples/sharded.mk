# Sharded extraction with make -j: N shards extracted side by side (one process each), then one merge.
# A killed shard resumes from its partial file on the next `make`; finished shards are not redone.
#
#   make -f sharded.mk -j4 SHARDS=4 IMAGES=~/photos OUT=~/run          # then: acseg fit-acg ~/run/feats.h5 ...
#
# On one machine with one GPU, shards share it; on a CPU, give each shard its share of the cores
# (EXTRACT_FLAGS="--workers 1" and OMP_NUM_THREADS). For a cluster, see slurm/.
ACSEG    ?= acseg
IMAGES   ?= camvid/images
OUT      ?= out-sharded
SHARDS   ?= 4
EXTRACT_FLAGS ?=

IMAGE_FILES := $(shell find $(IMAGES) -type f 2>/dev/null | sort)
SHARD_IDS := $(shell seq 0 $$(( $(SHARDS) - 1 )))
SHARD_FILES := $(foreach i,$(SHARD_IDS),$(OUT)/shards/feats.$(i).h5)

.PHONY: all clean
.SECONDARY:
all: $(OUT)/feats.h5

$(OUT)/shards:
	mkdir -p $@

$(OUT)/shards/feats.%.h5: $(IMAGE_FILES) | $(OUT)/shards
	$(ACSEG) extract $(IMAGES) --shard $*/$(SHARDS) -o $@ $(EXTRACT_FLAGS) --resume --overwrite -q

$(OUT)/feats.h5: $(SHARD_FILES)
	$(ACSEG) merge $^ -o $@ --overwrite

clean:
	rm -rf $(OUT)
