import torch, time, sys
torch.set_num_threads(2)
from esp_engine import cpu_linear as C
shapes=[(960,576),(576,576),(3072,576),(576,1536)] if sys.argv[1]=="smol" else [(1152,896),(896,896),(9728,896),(896,4864)]
head=(49152,576) if sys.argv[1]=="smol" else (151936,896)
L=30 if sys.argv[1]=="smol" else 24
for dt in (torch.bfloat16, torch.float32):
    Ws=[[torch.randn(o,i).to(dt) for (o,i) in shapes] for _ in range(L)]+[[torch.randn(*head).to(dt)]]
    allshapes=[shapes]*L+[[head]]
    ours=[[(C.pack(w),w.shape[0]) for w in ws] for ws in Ws]
    dnn=[[torch.ops.mkldnn._reorder_linear_weight(w,8) for w in ws] for ws in Ws]
    for rows in (1,4,10):
        xs={i:torch.randn(rows,i).to(dt) for sh in allshapes for (o,i) in sh}
        def f_ours():
            for sh,ws in zip(allshapes,ours):
                for (o,i),(p,n) in zip(sh,ws): C.linear(xs[i],p,n,None)
        def f_dnn():
            for sh,ws in zip(allshapes,dnn):
                for (o,i),p in zip(sh,ws): torch.ops.mkldnn._linear_pointwise(xs[i],p,None,"none",[],"")
        r={}
        for rep in range(3):
            for name,f in (("ours",f_ours),("onednn",f_dnn)):
                for _ in range(2): f()
                n=10; s=time.perf_counter()
                for _ in range(n): f()
                r.setdefault(name,[]).append((time.perf_counter()-s)/n*1e3)
        print(sys.argv[1], dt, rows, "rows: ours %.2f ms, onednn %.2f ms"%(min(r["ours"]),min(r["onednn"])), flush=True)
    del Ws, ours, dnn
