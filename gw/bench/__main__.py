from gw.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="gw bench")
